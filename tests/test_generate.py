"""The C decode step with its KV cache against the full training forward."""
import numpy as np
import pytest

from sqlgpt.errors import SqlgptError
from sqlgpt.generate import Decoder, generate_ids
from sqlgpt.model import GPT, Config

from helpers import rel_err


# lua defaults; a width below one decode panel (serial path); a width with a
# partial last panel on the two-thread path
@pytest.mark.parametrize("kw", [dict(), dict(embed_dim=48, num_heads=3, num_layers=2,
                                               seq_len=40, vocab_size=30),
                                dict(embed_dim=136, num_heads=8, num_layers=2, seq_len=24,
                                     vocab_size=70)])
def test_decode_step_matches_the_full_forward_at_every_position(rng, kw):
    cfg = Config(**kw, dropout=0.5)  # eval mode: dropout must not apply
    model = GPT(cfg)
    model.init_weights(rng)
    ids = rng.integers(0, cfg.n_classes, min(cfg.seq_len, 64)).astype(np.int32)
    model.forward(ids[None, :])
    full = model.acts.logits.copy()
    decoder = Decoder(model)
    for t, token in enumerate(ids):
        logits = decoder.step(int(token))
        assert rel_err(logits, full[t]) < 1e-5, t


def test_greedy_generation_equals_argmax_of_the_full_forward(rng):
    cfg = Config(vocab_size=50, embed_dim=32, num_heads=4, num_layers=2, seq_len=24)
    model = GPT(cfg)
    model.init_weights(rng)
    prompt = [3, 7, 9]
    generated = list(generate_ids(Decoder(model), prompt, 10, temperature=0))
    context = list(prompt)
    for token in generated:
        model.forward(np.array([context], np.int32))
        assert token == int(np.argmax(model.acts.logits[len(context) - 1]))
        context.append(token)


def test_cache_limits_are_checked(rng):
    cfg = Config(vocab_size=10, embed_dim=8, num_heads=2, num_layers=1, seq_len=4)
    model = GPT(cfg)
    model.init_weights(rng)
    decoder = Decoder(model)
    with pytest.raises(SqlgptError):
        decoder.step(cfg.n_classes)  # out of range: refused before the kernel runs
    for _ in range(4):
        decoder.step(1)
    with pytest.raises(SqlgptError, match="full"):
        decoder.step(1)
    # slides past seq_len
    assert len(list(generate_ids(Decoder(model), [1, 2, 3], 20, seed=0))) == 20


def test_a_decoder_keeps_the_weights_it_was_made_with(rng):
    cfg = Config(vocab_size=20, embed_dim=16, num_heads=2, num_layers=1, seq_len=8)
    model = GPT(cfg)
    model.init_weights(rng)
    decoder = Decoder(model)
    before = decoder.step(3).copy()
    for t in model.params:
        t.data[...] = rng.standard_normal(t.shape)
    decoder.reset()
    assert np.array_equal(decoder.step(3), before)
    assert not np.allclose(Decoder(model).step(3), before)


def bf16_rounded(x):
    """float32 -> nearest bfloat16 (ties to even), kept as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32).reshape(np.shape(x))


@pytest.mark.parametrize("kw", [dict(num_layers=2, seq_len=32),
                                dict(embed_dim=136, num_heads=8, num_layers=2, seq_len=24,
                                     vocab_size=70),
                                dict(embed_dim=40, num_heads=5, num_layers=1, seq_len=16,
                                     vocab_size=9)])
def test_bf16_decoding_is_exactly_the_model_with_bf16_rounded_matrices(rng, kw):
    """The bf16 panels hold each matrix weight rounded to nearest even, and
    the step computes with them in float32: the same logits as a float32
    decoder of a model whose matrices were rounded that way beforehand."""
    model = GPT(Config(**kw))
    model.init_weights(rng)
    bf16 = Decoder(model, "bf16")
    for t in model.params:
        if t.name not in ("wte", "wpe"):  # embeddings stay float32 in bf16 decoding
            t.data[...] = bf16_rounded(t.data)
    rounded = Decoder(model)
    for token in rng.integers(0, model.cfg.n_classes, 12):
        a, b = bf16.step(int(token)), rounded.step(int(token))
        assert rel_err(a, b) < 1e-5


def test_bf16_decoding_stays_close_to_float32(rng):
    model = GPT(Config())
    model.init_weights(rng)
    ids = rng.integers(0, model.cfg.n_classes, 48).astype(np.int32)
    model.forward(ids[None, :])
    full = model.acts.logits.copy()
    decoder = Decoder(model, "bf16")
    for t, token in enumerate(ids):
        assert rel_err(decoder.step(int(token)), full[t]) < 1e-2, t


def test_unknown_precision_is_refused(rng):
    model = GPT(Config(vocab_size=10, embed_dim=8, num_heads=2, num_layers=1, seq_len=4))
    with pytest.raises(SqlgptError, match="precision"):
        Decoder(model, "fp16")
