"""The C decode step with its KV cache against the full training forward,
for every preset and a grid of part combinations."""
import numpy as np
import pytest

from sqlgpt.model.arch import preset
from sqlgpt.errors import SqlgptError
from sqlgpt.inference.decoder import Decoder
from sqlgpt.inference.generate import generate_ids
from sqlgpt.model.model import GPT

from architectures import ARCHITECTURES, arch_of
from helpers import rel_err


def initialized(arch, rng, jitter=0.0):
    """A GPT with its init, moved off exact ones and zeros by jitter."""
    model = GPT(arch)
    model.init_weights(rng)
    for t in model.params:
        t.data += (jitter * rng.standard_normal(t.shape)).astype(np.float32)
    return model


def assert_decode_matches_forward(model, rng, precision="fp32", tol=1e-5):
    arch = model.arch
    ids = rng.integers(0, arch.n_vocab, min(arch.seq_len, 64)).astype(np.int32)
    model.forward(ids[None, :])
    full = model.acts.logits.copy()
    decoder = Decoder(model, precision)
    for t, token in enumerate(ids):
        assert rel_err(decoder.step(int(token)), full[t]) < tol, t


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_decode_step_matches_the_full_forward_at_every_position(rng, name):
    assert_decode_matches_forward(initialized(arch_of(name, seq_len=40), rng, jitter=0.05), rng)


# the lua defaults; a width below one decode panel (serial path); widths with
# a partial last panel on the two-thread path, for each MLP
@pytest.mark.parametrize("arch", [
    preset("lua"),
    preset("lua", embed_dim=48, num_heads=3, num_layers=2, seq_len=40, n_vocab=32),
    preset("lua", embed_dim=136, num_heads=8, num_layers=2, seq_len=24, n_vocab=72),
    preset("gpt2", embed_dim=136, num_heads=8, num_layers=2, seq_len=24, n_vocab=72),
    preset("llama", embed_dim=144, num_heads=8, kv_heads=2, num_layers=2, seq_len=24, n_vocab=72),
], ids=["lua", "lua-narrow", "lua-wide", "gpt2-wide", "llama-wide"])
def test_decode_step_at_panel_edges(rng, arch):
    assert_decode_matches_forward(initialized(arch, rng, jitter=0.02), rng)


def test_greedy_generation_equals_argmax_of_the_full_forward(rng):
    for name in ("lua", "gpt2", "llama"):
        model = initialized(arch_of(name, seq_len=24), rng, jitter=0.05)
        prompt = [3, 7, 9]
        generated = list(generate_ids(Decoder(model), prompt, 10, temperature=0))
        context = list(prompt)
        for token in generated:
            model.forward(np.array([context], np.int32))
            assert token == int(np.argmax(model.acts.logits[len(context) - 1])), name
            context.append(token)


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama", "rmsnorm-plain-sinusoidal-relu"])
def test_cache_limits_are_checked_and_generation_slides_past_the_context(rng, name):
    model = initialized(arch_of(name, seq_len=4), rng)
    decoder = Decoder(model)
    with pytest.raises(SqlgptError):
        decoder.step(model.arch.n_vocab)  # out of range: refused before the kernel runs
    for _ in range(4):
        decoder.step(1)
    with pytest.raises(SqlgptError, match="full"):
        decoder.step(1)
    assert len(list(generate_ids(Decoder(model), [1, 2, 3], 20, seed=0))) == 20


def test_grouped_query_attention_caches_only_the_kv_heads(rng):
    full, grouped = (Decoder(initialized(arch_of("llama", kv_heads=k), rng)) for k in (4, 1))
    assert grouped.vcache.size * 4 == full.vcache.size
    assert grouped.kcache.size * 4 == full.kcache.size


def test_a_decoder_keeps_the_weights_it_was_made_with(rng):
    model = initialized(arch_of("gpt2"), rng)
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


@pytest.mark.parametrize("arch", [
    preset("lua", num_layers=2, seq_len=32),
    preset("lua", embed_dim=136, num_heads=8, num_layers=2, seq_len=24, n_vocab=72),
    preset("lua", embed_dim=40, num_heads=5, num_layers=1, seq_len=16, n_vocab=11),
    preset("gpt2", embed_dim=40, num_heads=5, num_layers=2, seq_len=16, n_vocab=11,
           tie_weights=False),
    preset("llama", embed_dim=144, num_heads=8, kv_heads=2, num_layers=2, seq_len=24, n_vocab=72),
], ids=["lua", "lua-wide", "lua-odd", "gpt2-untied", "llama"])
@pytest.mark.parametrize("precision, rounding", [
    ("bf16", bf16_rounded), ("f16", lambda x: x.astype(np.float16).astype(np.float32))])
def test_half_decoding_is_exactly_the_model_with_rounded_matrices(rng, arch, precision,
                                                                   rounding):
    """The bf16 and f16 panels hold each matrix weight rounded to nearest
    even, and the step computes with them in float32: the same logits as a
    float32 decoder of a model whose matrices were rounded that way
    beforehand (embeddings, norm gains and biases stay float32)."""
    model = initialized(arch, rng, jitter=0.02)
    half = Decoder(model, precision)
    for t in model.params:
        if t.data.ndim == 2 and t.name not in ("wte", "wpe"):
            t.data[...] = rounding(t.data)
    rounded = Decoder(model)
    for token in rng.integers(0, arch.n_vocab, 12):
        assert rel_err(half.step(int(token)), rounded.step(int(token))) < 1e-5


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama"])
@pytest.mark.parametrize("precision, tol", [("bf16", 1e-2), ("f16", 2e-3)])
def test_half_decoding_stays_close_to_float32(rng, name, precision, tol):
    base, overrides = ARCHITECTURES[name]
    model = initialized(preset(base, **overrides), rng)  # the presets at their default sizes
    assert_decode_matches_forward(model, rng, precision, tol=tol)


def test_unknown_precision_is_refused(rng):
    with pytest.raises(SqlgptError, match="precision"):
        Decoder(GPT(arch_of("lua")), "fp16")


def test_an_empty_context_is_a_clear_error(rng):
    with pytest.raises(SqlgptError, match="empty"):
        list(generate_ids(Decoder(initialized(arch_of("lua"), rng)), [], 3))
