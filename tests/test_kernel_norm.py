"""norm.c (layernorm, RMSNorm) against float64 PyTorch on fresh random inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqlgpt._kernel import lib
from sqlgpt.model.tensor import fptr

from helpers import rel_err
from kernel_helpers import NULL, TOL, f32, t64, zeros_like


@pytest.mark.parametrize("N,C", [(1, 4), (37, 128), (300, 96)])
@pytest.mark.parametrize("affine", [False, True])
def test_layernorm(rng, N, C, affine):
    x, w, b, dout = f32(rng, N, C, scale=3.0) + 2.0, f32(rng, C), f32(rng, C), f32(rng, N, C)
    out, mean, rstd = np.zeros((N, C), np.float32), np.zeros(N, np.float32), np.zeros(N, np.float32)
    wp, bp = (fptr(w), fptr(b)) if affine else (NULL, NULL)
    lib.layernorm_forward(fptr(out), fptr(mean), fptr(rstd), fptr(x), wp, bp, N, C, 1e-5)
    tx, tw, tb = t64(x), t64(w), t64(b)
    ref = F.layer_norm(tx, (C,), tw if affine else None, tb if affine else None, eps=1e-5)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dx, dw, db = f32(rng, N, C), zeros_like(w), zeros_like(b)  # dx: stale, overwritten
    lib.layernorm_backward(fptr(dx), fptr(dw) if affine else NULL, fptr(db) if affine else NULL,
                           NULL, fptr(dout), fptr(x), wp, fptr(mean), fptr(rstd), N, C)
    assert rel_err(dx, tx.grad) < TOL
    if affine:
        assert rel_err(dw, tw.grad) < TOL
        assert rel_err(db, tb.grad) < TOL




@pytest.mark.parametrize("N,C", [(1, 4), (37, 128), (300, 96), (700, 288)])
@pytest.mark.parametrize("affine", [False, True])
def test_rmsnorm(rng, N, C, affine):
    x, w, dout = f32(rng, N, C, scale=3.0) + 2.0, f32(rng, C) + 1.0, f32(rng, N, C)
    out, rstd = np.zeros((N, C), np.float32), np.zeros(N, np.float32)
    wp = fptr(w) if affine else NULL
    lib.rmsnorm_forward(fptr(out), fptr(rstd), fptr(x), wp, N, C, 1e-5)
    tx, tw = t64(x), t64(w)
    ref = F.rms_norm(tx, (C,), tw if affine else None, eps=1e-5)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dx, dw = f32(rng, N, C), zeros_like(w)
    lib.rmsnorm_backward(fptr(dx), fptr(dw) if affine else NULL, NULL, fptr(dout), fptr(x), wp,
                         fptr(rstd), N, C)
    assert rel_err(dx, tx.grad) < TOL
    if affine:
        assert rel_err(dw, tw.grad) < TOL


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_backward_adds_the_skip_gradient_and_accumulates_gains(rng, norm):
    """dinp = dskip + the norm's gradient, in place over dskip too (the
    residual stream's backward); gain gradients add to what they held."""
    N, C = 50, 64
    x, w, b, dout, dskip = (f32(rng, N, C), f32(rng, C), f32(rng, C), f32(rng, N, C),
                            f32(rng, N, C))
    out, mean, rstd = zeros_like(x), np.zeros(N, np.float32), np.zeros(N, np.float32)
    dw0, db0 = f32(rng, C), f32(rng, C)

    def backward(dinp, skip, dw, db):
        if norm == "layernorm":
            lib.layernorm_backward(fptr(dinp), fptr(dw), fptr(db), fptr(skip), fptr(dout), fptr(x),
                                   fptr(w), fptr(mean), fptr(rstd), N, C)
        else:
            lib.rmsnorm_backward(fptr(dinp), fptr(dw), fptr(skip), fptr(dout), fptr(x), fptr(w),
                                 fptr(rstd), N, C)

    if norm == "layernorm":
        lib.layernorm_forward(fptr(out), fptr(mean), fptr(rstd), fptr(x), fptr(w), fptr(b), N, C,
                              1e-5)
    else:
        lib.rmsnorm_forward(fptr(out), fptr(rstd), fptr(x), fptr(w), N, C, 1e-5)
    plain, zero = zeros_like(x), zeros_like(x)
    backward(plain, zero, zeros_like(w), zeros_like(b))
    in_place, dw, db = dskip.copy(), dw0.copy(), db0.copy()
    backward(in_place, in_place, dw, db)
    assert rel_err(in_place, dskip.astype(np.float64) + plain) < TOL
    once_w, once_b = zeros_like(w), zeros_like(b)
    backward(zeros_like(x), zero, once_w, once_b)
    assert rel_err(dw - dw0, once_w) < TOL
    if norm == "layernorm":
        assert rel_err(db - db0, once_b) < TOL
