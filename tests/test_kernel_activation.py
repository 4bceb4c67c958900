"""activation.c against float64 PyTorch on fresh random inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqlgpt._kernel import lib
from sqlgpt.model.tensor import fptr

from helpers import rel_err
from kernel_helpers import TOL, f32, t64


@pytest.mark.parametrize("name,ref_fn", [("relu", F.relu),
                                         ("gelu", lambda t: F.gelu(t, approximate="tanh"))])
@pytest.mark.parametrize("n", [7, 1000, 100003])
def test_activation(rng, name, ref_fn, n):
    x, dout = f32(rng, n, scale=2.0), f32(rng, n)
    out = np.zeros(n, np.float32)
    getattr(lib, f"{name}_forward")(fptr(out), fptr(x), n)
    tx = t64(x)
    ref = ref_fn(tx)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dx = f32(rng, n)  # stale values: backward writes dinp, it does not add to it
    getattr(lib, f"{name}_backward")(fptr(dx), fptr(dout), fptr(x), n)
    assert rel_err(dx, tx.grad) < TOL




@pytest.mark.parametrize("n", [7, 1000, 100003])
def test_swiglu(rng, n):
    gate, up, dh = f32(rng, n, scale=3.0), f32(rng, n), f32(rng, n)
    h = f32(rng, n)
    lib.swiglu_forward(fptr(h), fptr(gate), fptr(up), n)
    tg, tu = t64(gate), t64(up)
    ref = F.silu(tg) * tu
    assert rel_err(h, ref.detach()) < TOL
    ref.backward(torch.tensor(dh, dtype=torch.float64))
    dgate, dup = f32(rng, n), dh.copy()  # dup over dh itself, as the model calls it
    lib.swiglu_backward(fptr(dgate), fptr(dup), fptr(dup), fptr(gate), fptr(up), n)
    assert rel_err(dgate, tg.grad) < TOL
    assert rel_err(dup, tu.grad) < TOL


def test_activations_of_extreme_inputs_are_exact_tails_and_nan_stays_nan():
    x = np.array([-1e30, -100.0, -88.0, 0.0, 88.0, 100.0, 1e30, np.nan], np.float32)
    n = x.size
    out, grad, ones = np.zeros_like(x), np.zeros_like(x), np.ones_like(x)
    lib.gelu_forward(fptr(out), fptr(x), n)
    np.testing.assert_array_equal(out[:-1], np.where(x[:-1] > 0, x[:-1], 0))
    lib.gelu_backward(fptr(grad), fptr(ones), fptr(x), n)
    np.testing.assert_array_equal(grad[:-1], [0, 0, 0, 0.5, 1, 1, 1])  # gelu'(0) = 1/2
    assert np.isnan(out[-1]) and np.isnan(grad[-1])
    up, dgate, dup = np.ones_like(x), np.zeros_like(x), np.ones_like(x)
    lib.swiglu_forward(fptr(out), fptr(x), fptr(up), n)
    lib.swiglu_backward(fptr(dgate), fptr(dup), fptr(dup), fptr(x), fptr(up), n)
    assert np.isfinite(out[:-1]).all() and np.isfinite(dgate[:-1]).all()
    assert out[0] == 0 and out[-2] == np.float32(1e30) and np.isnan(out[-1])
