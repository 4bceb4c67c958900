"""The small ops (embedding, loss, dropout, optimizer) against float64
PyTorch on fresh random inputs: relative error below 1e-5."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqlgpt._kernel import ffi, lib
from sqlgpt.model.tensor import fptr, iptr

from helpers import rel_err
from kernel_helpers import NULL, TOL, f32, t64, zeros_like


@pytest.mark.parametrize("B,T,C,V", [(1, 1, 4, 3), (4, 33, 64, 50), (2, 256, 128, 428)])
@pytest.mark.parametrize("positions", [True, False])  # False: rope or no positions, wpe NULL
def test_embedding(rng, B, T, C, V, positions):
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    ids[0, : min(T, 3)] = 1  # repeated ids exercise the scatter-add
    wte, wpe, dout = f32(rng, V, C), f32(rng, T + 5, C), f32(rng, B, T, C)
    out = np.zeros((B, T, C), np.float32)
    lib.embedding_forward(fptr(out), iptr(ids), fptr(wte), fptr(wpe) if positions else NULL,
                          B, T, C)
    twte, twpe = t64(wte), t64(wpe)
    ref = twte[torch.tensor(ids, dtype=torch.long)] + (twpe[:T] if positions else 0)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dwte, dwpe = zeros_like(wte), zeros_like(wpe)
    lib.embedding_backward(fptr(dwte), fptr(dwpe) if positions else NULL, fptr(dout), iptr(ids),
                           B, T, C)
    assert rel_err(dwte, twte.grad) < TOL
    if positions:
        assert rel_err(dwpe, twpe.grad) < TOL


@pytest.mark.parametrize("N,V", [(1, 2), (50, 428), (1000, 65)])
def test_crossentropy(rng, N, V):
    logits = f32(rng, N, V, scale=3.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[:: 3] = 0  # the ignore index (padding)
    if (targets != 0).sum() == 0:
        targets[0] = V - 1
    losses = np.zeros(N, np.float32)
    loss_ptr = ffi.new("double *")
    assert lib.crossentropy_forward(loss_ptr, fptr(losses), fptr(logits), iptr(targets), N, V,
                                    0) == lib.SQLGPT_OK
    loss = loss_ptr[0]
    tl = t64(logits)
    ref = F.cross_entropy(tl, torch.tensor(targets, dtype=torch.long), ignore_index=0)
    assert abs(loss - ref.item()) / abs(ref.item()) < TOL
    ref.backward()
    dlogits = np.zeros_like(logits)
    lib.crossentropy_backward(fptr(dlogits), fptr(logits), iptr(targets), N, V, 0, 1.0)
    assert rel_err(dlogits, tl.grad) < TOL
    assert np.all(dlogits[targets == 0] == 0)


def test_crossentropy_all_ignored_is_zero_not_nan(rng):
    logits, targets = f32(rng, 4, 5), np.zeros(4, np.int32)
    losses, dlogits = np.zeros(4, np.float32), np.ones((4, 5), np.float32)
    loss = ffi.new("double *", 1.0)
    lib.crossentropy_forward(loss, fptr(losses), fptr(logits), iptr(targets), 4, 5, 0)
    assert loss[0] == 0.0
    lib.crossentropy_backward(fptr(dlogits), fptr(logits), iptr(targets), 4, 5, 0, 1.0)
    assert np.all(dlogits == 0)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_dropout(rng, p):
    n = 200_000
    x, dout = f32(rng, n), f32(rng, n)
    seed = int(rng.integers(0, 2**63))
    out = np.zeros(n, np.float32)
    lib.dropout_forward(fptr(out), fptr(x), n, p, seed)
    keep = out != 0
    # kept elements are scaled by 1/(1-p); the rate matches p within 5 sigma
    ref = np.where(keep, x.astype(np.float64) / (1 - p), 0.0)
    assert rel_err(out, ref) < TOL
    assert abs((~keep).mean() - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-6
    # backward uses the same mask, recomputed from the seed
    dx = f32(rng, n)  # stale values: overwritten
    lib.dropout_backward(fptr(dx), fptr(dout), n, p, seed)
    assert rel_err(dx, np.where(keep, dout.astype(np.float64) / (1 - p), 0.0)) < TOL
    # the fused residual form applies the same mask
    residual, joined = f32(rng, n), np.zeros(n, np.float32)
    lib.residual_dropout_forward(fptr(joined), fptr(residual), fptr(x), n, p, seed)
    assert rel_err(joined, residual + out.astype(np.float64)) < TOL
    # the same seed gives the same mask; another seed a different one
    again = np.zeros(n, np.float32)
    lib.dropout_forward(fptr(again), fptr(x), n, p, seed)
    np.testing.assert_array_equal(again, out)
    if p > 0:
        lib.dropout_forward(fptr(again), fptr(x), n, p, seed + 1)
        assert not np.array_equal(again != 0, keep)


@pytest.mark.parametrize("name,weight_decay,momentum", [
    ("adamw", 0.0, 0), ("adamw", 0.1, 0), ("adam", 0.1, 0), ("sgd", 0.0, 0.0), ("sgd", 0.1, 0.9)])
def test_optimizers_match_torch_step_by_step(rng, name, weight_decay, momentum):
    n, lr, b1, b2, eps = 5000, 1e-2, 0.9, 0.99, 1e-8
    data = f32(rng, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    tp = torch.nn.Parameter(torch.tensor(data, dtype=torch.float64))
    opt = {"adamw": lambda: torch.optim.AdamW([tp], lr, (b1, b2), eps, weight_decay),
           "adam": lambda: torch.optim.Adam([tp], lr, (b1, b2), eps, weight_decay),
           "sgd": lambda: torch.optim.SGD([tp], lr, momentum, weight_decay=weight_decay)}[name]()
    for step in range(1, 6):
        grad = f32(rng, n)
        if name == "sgd":
            lib.sgd_update(fptr(data), fptr(grad), fptr(m), n, lr, momentum, weight_decay)
        else:
            lib.adamw_update(fptr(data), fptr(grad), fptr(m), fptr(v), n, lr, b1, b2, eps,
                             weight_decay, name == "adamw", step)
        tp.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        assert rel_err(data, tp.detach()) < TOL, step
    state = opt.state[tp]
    if name == "sgd" and momentum:
        assert rel_err(m, state["momentum_buffer"]) < TOL
    elif name != "sgd":
        assert rel_err(m, state["exp_avg"]) < TOL
        assert rel_err(v, state["exp_avg_sq"]) < TOL


def test_sum_squares(rng):
    x = f32(rng, 123457)
    assert abs(lib.sum_squares(fptr(x), x.size) - np.sum(x.astype(np.float64) ** 2)) < 1e-9 * x.size
