"""rope.c against an independent float64 PyTorch rotation (transformers'
llama layout: pairs (i, i + hs/2), rotate_half) on fresh random inputs."""
import numpy as np
import pytest
import torch

from sqlgpt._kernel import lib
from sqlgpt.model.arch import preset
from sqlgpt.model.model import model_config
from sqlgpt.model.tensor import fptr

from helpers import rel_err
from kernel_helpers import TOL, f32, t64


def table(T, hs, theta, **scaling):
    """rope.c's cos and sin tables (T, hs/2) of a one-head model."""
    cfg = model_config(preset("llama", embed_dim=hs, num_heads=1, rope_theta=theta, **scaling))
    cos, sin = np.zeros((T, hs // 2), np.float32), np.zeros((T, hs // 2), np.float32)
    lib.rope_table(fptr(cos), fptr(sin), T, hs, cfg)
    return cos, sin


def reference_rope(x, B, T, heads, hs, theta, inv_freq=None):
    """x (B,T,heads*hs) rotated as transformers' apply_rotary_pos_emb does."""
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, hs/2)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]
    x = x.view(B, T, heads, hs)
    rotated = torch.cat([-x[..., hs // 2:], x[..., :hs // 2]], dim=-1)
    return (x * cos + rotated * sin).reshape(B, T, heads * hs)


@pytest.mark.parametrize("B,T,heads,hs,theta", [(1, 1, 1, 2, 10000.0), (2, 17, 4, 8, 10000.0),
                                                (3, 256, 6, 48, 10000.0), (1, 64, 2, 16, 500.0),
                                                (2, 1000, 1, 64, 1e6)])
def test_rope(rng, B, T, heads, hs, theta):
    x, dout = f32(rng, B, T, heads * hs), f32(rng, B, T, heads * hs)
    cos, sin = table(T, hs, theta)
    out = x.copy()
    lib.rope_forward(fptr(out), fptr(cos), fptr(sin), B, T, heads, hs)
    tx = t64(x)
    ref = reference_rope(tx, B, T, heads, hs, theta)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dx = dout.copy()
    lib.rope_backward(fptr(dx), fptr(cos), fptr(sin), B, T, heads, hs)
    assert rel_err(dx, tx.grad) < TOL


def test_rope_keeps_norms_and_position_zero(rng):
    B, T, heads, hs = 1, 50, 3, 16
    x = f32(rng, B, T, heads * hs)
    cos, sin = table(T, hs, 10000.0)
    out = x.copy()
    lib.rope_forward(fptr(out), fptr(cos), fptr(sin), B, T, heads, hs)
    np.testing.assert_array_equal(out[0, 0], x[0, 0])  # angle 0
    per_head = lambda a: np.linalg.norm(a.reshape(T, heads, hs).astype(np.float64), axis=-1)
    np.testing.assert_allclose(per_head(out), per_head(x), rtol=1e-5)


SCALINGS = [
    ("linear", dict(factor=4.0), dict(rope_factor=4.0)),
    ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64),
     dict(rope_factor=8.0, rope_low_freq=1.0, rope_high_freq=4.0, rope_original_context=64)),
    ("llama3", dict(factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                    original_max_position_embeddings=512),
     dict(rope_factor=32.0, rope_low_freq=2.0, rope_high_freq=8.0, rope_original_context=512)),
]


@pytest.mark.parametrize("kind,hf,ours", SCALINGS)
def test_scaled_rope_turns_as_transformers(rng, kind, hf, ours):
    """Stretched frequencies against transformers' own rope initialisers:
    the pairs below, inside and above the blend all occur at hs 64."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    B, T, heads, hs, theta = 1, 300, 2, 64, 10000.0
    config = LlamaConfig(hidden_size=hs * heads, num_attention_heads=heads,
                         max_position_embeddings=T,
                         rope_parameters={"rope_type": kind, "rope_theta": theta, **hf})
    inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    x = f32(rng, B, T, heads * hs)
    cos, sin = table(T, hs, theta, rope_scaling=kind, **ours)
    out = x.copy()
    lib.rope_forward(fptr(out), fptr(cos), fptr(sin), B, T, heads, hs)
    ref = reference_rope(t64(x), B, T, heads, hs, theta, inv_freq.double())
    assert rel_err(out, ref.detach()) < 1e-5
    plain = reference_rope(t64(x), B, T, heads, hs, theta)
    assert rel_err(out, plain.detach()) > 1e-2  # the scaling changed something


@pytest.mark.parametrize("fields", [dict(rope_original_context=0),
                                    dict(rope_original_context=64, rope_low_freq=4.0),
                                    dict(rope_original_context=64, rope_factor=0.0)])
def test_impossible_llama3_scalings_are_refused(fields):
    from sqlgpt.errors import SqlgptError
    with pytest.raises(SqlgptError, match="rope"):
        preset("llama", rope_scaling="llama3", **fields).validate()
