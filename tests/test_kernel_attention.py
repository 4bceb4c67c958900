"""attention.c against float64 PyTorch on fresh random inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqlgpt._kernel import lib
from sqlgpt.model.tensor import fptr

from helpers import rel_err
from kernel_helpers import TOL, f32, t64


def reference_attention(q, k, v, B, T, NH, KVH, hs):
    """PyTorch's causal attention with each kv head repeated over its group."""
    heads = lambda t, n: t.view(B, T, n, hs).transpose(1, 2)  # (B, n, T, hs)
    kr = heads(k, KVH).repeat_interleave(NH // KVH, dim=1)
    vr = heads(v, KVH).repeat_interleave(NH // KVH, dim=1)
    out = F.scaled_dot_product_attention(heads(q, NH), kr, vr, is_causal=True)
    return out.transpose(1, 2).reshape(B, T, NH * hs)


# head sizes 4 to 64; grouped-query (KVH < NH) down to multi-query (KVH = 1)
@pytest.mark.parametrize("B,T,NH,KVH,hs", [
    (1, 1, 2, 2, 4), (2, 17, 4, 4, 8), (3, 64, 8, 8, 16), (1, 100, 3, 3, 16), (2, 70, 2, 2, 24),
    (1, 33, 6, 6, 64), (2, 40, 4, 2, 8), (1, 70, 6, 3, 16), (2, 65, 8, 1, 16), (1, 1, 4, 1, 8),
    (2, 129, 6, 2, 48)])
def test_attention(rng, B, T, NH, KVH, hs):
    C, KVC = NH * hs, KVH * hs
    q, dout = f32(rng, B, T, C), f32(rng, B, T, C)
    k, v = f32(rng, B, T, KVC), f32(rng, B, T, KVC)
    out, lse = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32)
    assert lib.attention_forward(fptr(out), fptr(lse), fptr(q), fptr(k), fptr(v), B, T, NH, KVH,
                                 hs) == lib.SQLGPT_OK
    tq, tk, tv = t64(q), t64(k), t64(v)
    ref = reference_attention(tq, tk, tv, B, T, NH, KVH, hs)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dq, dk, dv = f32(rng, B, T, C), f32(rng, B, T, KVC), f32(rng, B, T, KVC)  # stale: overwritten
    lib.attention_backward(fptr(dq), fptr(dk), fptr(dv), fptr(dout), fptr(q), fptr(k), fptr(v),
                           fptr(out), fptr(lse), B, T, NH, KVH, hs)
    # a lone query (T = 1) has p = 1 and zero dq, dk up to rounding: there the
    # error is measured against the incoming gradient's size instead
    floor = 0.1 * np.linalg.norm(dout.astype(np.float64))
    for ours, t in ((dq, tq), (dk, tk), (dv, tv)):
        ref_grad = t.grad.numpy()
        err = np.linalg.norm(ours - ref_grad) / max(np.linalg.norm(ref_grad), floor)
        assert err < TOL


def test_attention_is_causal(rng):
    """Changing a later token never changes an earlier output."""
    B, T, C, NH = 1, 10, 16, 2
    q, k, v = (f32(rng, B, T, C) for _ in range(3))
    outs = []
    for _ in range(2):
        out, lse = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32)
        lib.attention_forward(fptr(out), fptr(lse), fptr(q), fptr(k), fptr(v), B, T, NH, NH,
                              C // NH)
        outs.append(out)
        k[:, -1], v[:, -1] = f32(rng, C), f32(rng, C)
    np.testing.assert_array_equal(outs[0][:, :-1], outs[1][:, :-1])
    assert not np.array_equal(outs[0][:, -1], outs[1][:, -1])




def test_scratch_that_cannot_grow_is_a_status_not_an_abort():
    """A head's scratch for T = 2^28 would be 320 GB: the call returns
    SQLGPT_NOMEM having touched nothing (the buffers here are far too small
    for T; they are never read), the status is cleared, and Python raises
    MemoryError, which the CLI turns into one line."""
    from sqlgpt.model.model import check_status
    q = np.zeros(64, np.float32)
    status = lib.attention_forward(fptr(q), fptr(q), fptr(q), fptr(q), fptr(q), 1, 2**28, 1, 1,
                                   64)
    assert status == lib.SQLGPT_NOMEM
    assert not q.any()
    with pytest.raises(MemoryError):
        check_status(status)
    small = np.zeros((1, 4, 8), np.float32)  # the next call starts clean
    assert lib.attention_forward(fptr(small), fptr(np.zeros(4, np.float32)), fptr(small),
                                 fptr(small), fptr(small), 1, 4, 1, 1, 8) == lib.SQLGPT_OK
