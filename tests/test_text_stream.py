"""Streaming detokenization: TextStream (one O(1) step per token) gives
exactly what decoding the whole sequence gives, for every tokenizer kind,
cut before the first stop string, with nothing shown that a stop string
could still claim."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlgpt.api import TextStream
from sqlgpt.data.tokenizers import TOKENIZERS

from conftest import CORPUS

TEXT = CORPUS.read_text()[:20000] + " Ünïcödé ΣΟΦΟΣ 中文 😀 straße"


@pytest.fixture(scope="module", params=["word", "char", "byte", "bpe"])
def tokenizer(request):
    return TOKENIZERS[request.param].build([TEXT], 300)


def reference(tokenizer, prompt, generated, stop):
    """What the stream must show in all: the prompt's text, then the
    generated text up to the first stop string."""
    prompt_text = tokenizer.decode(prompt)
    rest = tokenizer.decode(list(prompt) + list(generated))[len(prompt_text):]
    cuts = [rest.find(s) for s in stop if s in rest]
    return prompt_text + (rest[:min(cuts)] if cuts else rest)


def streamed(tokenizer, prompt, generated, stop):
    text = TextStream(tokenizer, prompt, stop)
    pieces = [text.shown]
    for token in generated:
        pieces.append(text.push(token))
        if text.stopped:
            break
    else:
        pieces.append(text.finish())
    assert "".join(pieces) == text.shown
    return "".join(pieces)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), stop_kind=st.sampled_from(["none", "from text", "odd"]))
def test_the_stream_shows_what_decoding_the_whole_gives(tokenizer, seed, stop_kind):
    rng = np.random.default_rng(seed)
    at = int(rng.integers(0, 19000))
    prompt = tokenizer.encode(TEXT[at:at + int(rng.integers(1, 40))]).tolist() or [5]
    generated = tokenizer.encode(TEXT[at + 40:at + 400]).tolist()
    if rng.random() < 0.5:  # random ids too: characters cut between tokens, specials
        generated = rng.integers(0, tokenizer.n_ids, 60).tolist()
    whole = tokenizer.decode(generated)
    stop = ()
    if stop_kind == "from text" and len(whole) > 3:
        a = int(rng.integers(0, len(whole) - 2))
        stop = (whole[a:a + int(rng.integers(1, 4))], "zzzz-never")
    elif stop_kind == "odd":
        stop = ("e ", "\n\n", "th")
    assert streamed(tokenizer, prompt, generated, stop) == reference(tokenizer, prompt,
                                                                     generated, stop)


def test_text_that_may_begin_a_stop_string_waits(tokenizer):
    ids = tokenizer.encode("the the and the the").tolist()
    text = TextStream(tokenizer, ids[:1], ("and the",))
    shown = "".join(text.push(t) for t in ids[1:])
    assert text.stopped and text.shown == "the the " and "a" not in shown
