"""Chat templates rendered as transformers' apply_chat_template renders
them (real models' templates: Qwen2.5's ChatML, llama 3.2's, SmolLM2's, and
sqlgpt's default), the ids as transformers tokenizes them, the assistant
mask as its return_assistant_tokens_mask gives it, and hostile templates as
one-line errors."""
from pathlib import Path

import numpy as np
import pytest

from sqlgpt.chat.conversation import ChatFormat
from sqlgpt.chat.template import CHATML_TEMPLATE, DEFAULT_TEMPLATE, render
from sqlgpt.data.tokenizers import HFTokenizer
from sqlgpt.errors import SqlgptError

from conftest import CORPUS

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEMPLATES = {p.stem: p.read_text() for p in
             (Path(__file__).parent / "data" / "chat_templates").glob("*.jinja")}
TEMPLATES.update(default=DEFAULT_TEMPLATE, chatml=CHATML_TEMPLATE)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>"]
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+" \
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Which is bigger, 7 or 12?"},
     {"role": "assistant", "content": "Twelve."},
     {"role": "user", "content": "  And 3 or 2?\n"}],
    [{"role": "user", "content": "café 你好 🙂 it's"},
     {"role": "assistant", "content": "Indeed: 1234 and\ttabs."}],
]


@pytest.fixture(scope="module")
def tokenizer_pair():
    """(transformers' tokenizer, sqlgpt's hf tokenizer) of one byte-level
    BPE with every template's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS.read_text()[:50000]], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                                  eos_token="<eos>")
    ours = HFTokenizer(tok.to_str(), {"bos": tok.token_to_id("<bos>"),
                                      "eos": tok.token_to_id("<eos>")})
    return theirs, ours


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("prompt", [False, True])
def test_rendering_and_ids_equal_transformers(tokenizer_pair, name, prompt):
    theirs, ours = tokenizer_pair
    chat = ChatFormat(ours, TEMPLATES[name])
    for messages in CONVERSATIONS:
        want = theirs.apply_chat_template(messages, chat_template=TEMPLATES[name],
                                          tokenize=False, add_generation_prompt=prompt)
        got, _ = chat.render(messages, add_generation_prompt=prompt)
        assert got == want
        want_ids = theirs.apply_chat_template(messages, chat_template=TEMPLATES[name],
                                              tokenize=True, add_generation_prompt=prompt,
                                              return_dict=False)
        if isinstance(want_ids, dict):
            want_ids = want_ids["input_ids"]
        assert chat.encode_text(got) == list(want_ids)


def test_the_assistant_mask_equals_transformers(tokenizer_pair):
    theirs, ours = tokenizer_pair
    chat = ChatFormat(ours, DEFAULT_TEMPLATE)  # its assistant turns are {% generation %} blocks
    for messages in CONVERSATIONS:
        want = theirs.apply_chat_template(messages, chat_template=DEFAULT_TEMPLATE,
                                          tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        ids, mask = chat.encode(messages)
        assert ids.tolist() == list(want["input_ids"])
        assert mask.astype(int).tolist() == list(want["assistant_masks"])


@pytest.mark.parametrize("name", ["qwen2.5", "smollm2", "chatml", "llama-3.2"])
def test_templates_without_generation_blocks_mark_each_reply_and_its_end(tokenizer_pair,
                                                                          name):
    _, ours = tokenizer_pair
    chat = ChatFormat(ours, TEMPLATES[name])
    messages = CONVERSATIONS[2]
    ids, mask = chat.encode(messages)
    reply = ours.decode(ids[mask])
    assert reply.startswith("Indeed: 1234 and\ttabs.")
    end = "<|eot_id|>" if name.startswith("llama") else "<|im_end|>"
    assert chat.end_id == SPECIALS.index(end)
    assert ids[mask].tolist().count(chat.end_id) == 1
    prompt = chat.prompt(messages[:1])
    assert ids[:len(prompt)].tolist() == prompt.tolist()  # the reply follows its prompt


def test_the_default_template_marks_replies_with_bos_and_eos(tokenizer_pair):
    _, ours = tokenizer_pair
    text, spans = render(DEFAULT_TEMPLATE, CONVERSATIONS[1][:3],
                         {"bos_token": "<bos>", "eos_token": "<eos>"}, True)
    assert text == ("<bos>system\nYou answer in one word.<eos><bos>user\nWhich is bigger, 7 or "
                    "12?<eos><bos>assistant\nTwelve.<eos><bos>assistant\n")
    assert [text[a:b] for a, b in spans] == ["Twelve.<eos>"]


HOSTILE = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}"
     "{% endfor %}", "ran past"),
    ("{{ 'x' * 100000000 }}", "too long"),
    ("{{ ''.__class__.__mro__ }}", "failed"),
    ("{{ raise_exception('no system messages here') }}", "no system messages here"),
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ messages[99]['content'] }}", "failed"),
    ("{% set ns = namespace(_secret=1) %}", "failed"),
    ("", "empty"),
]


@pytest.mark.parametrize("source,text", HOSTILE)
def test_hostile_templates_are_one_line_errors(source, text, monkeypatch):
    import sqlgpt.chat.template as template
    monkeypatch.setattr(template, "RENDER_SECONDS", 1.0)
    with pytest.raises(SqlgptError, match=text) as e:
        render(source, CONVERSATIONS[0], {}, True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("messages,text", [
    ([], "non-empty list"), ("hi", "non-empty list"), ([{"role": "user"}], "no text content"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"), (["x"], "not an object")])
def test_bad_messages_are_refused(messages, text):
    with pytest.raises(SqlgptError, match=text):
        render(DEFAULT_TEMPLATE, messages, {}, True)


def test_ids_of_special_texts_are_the_specials_and_other_text_is_text(tokenizer_pair):
    _, ours = tokenizer_pair
    chat = ChatFormat(ours, CHATML_TEMPLATE)
    ids = chat.encode_text("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == SPECIALS.index("<|im_start|>") and ids[-1] == SPECIALS.index("<|im_end|>")
    assert np.array_equal(ours.encode("<|im_start|>"), ours.encode("<|im_start|>"))
    assert SPECIALS.index("<|im_start|>") not in ours.encode("<|im_start|>").tolist()
