"""Every kernel op's forward and backward against PyTorch (float64 reference)
on fresh random inputs: relative error below 1e-5."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqlgpt._kernel import ffi, lib
from sqlgpt.tensor import fptr, iptr

from helpers import rel_err

TOL = 1e-5
NULL = ffi.NULL


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def zeros_like(a):
    return np.zeros_like(a, dtype=np.float32)


# several K blocks (of 192) with partial panels: (21, 1100, 70) in forward and
# dinp; (21, 1100, 70), (600, 40, 50) and (1000, 96, 200) take the split-K
# path (K far longer than M and N) in dweight, (200, 512, 128) the row blocks
# with one 512-deep panel
@pytest.mark.parametrize("N,C,OC", [(1, 8, 8), (7, 13, 29), (64, 128, 428), (200, 512, 128),
                                    (33, 70, 300), (21, 1100, 70), (600, 40, 50),
                                    (1000, 96, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul(rng, N, C, OC, with_bias):
    x, w, b, dout = f32(rng, N, C), f32(rng, C, OC), f32(rng, OC), f32(rng, N, OC)
    out = np.zeros((N, OC), np.float32)
    lib.matmul_forward(fptr(out), fptr(x), fptr(w), fptr(b) if with_bias else NULL, N, C, OC)
    tx, tw, tb = t64(x), t64(w), t64(b)
    ref = tx @ tw + (tb if with_bias else 0)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dx, dw, db = zeros_like(x), zeros_like(w), zeros_like(b)
    lib.matmul_backward(fptr(dx), fptr(dw), fptr(db) if with_bias else NULL, fptr(dout),
                        fptr(x), fptr(w), N, C, OC, 0)
    assert rel_err(dx, tx.grad) < TOL
    assert rel_err(dw, tw.grad) < TOL
    if with_bias:
        assert rel_err(db, tb.grad) < TOL


SPLIT_K_MANY_THREADS = """
import numpy as np
from sqlgpt._kernel import ffi, lib
from sqlgpt.tensor import fptr
rng = np.random.default_rng(0)
C = OC = 33
w = np.zeros((C, OC), np.float32)
for N in (4000, 40):  # the first call leaves every thread's partial sums in its scratch;
    # in the second, split-K over 64 threads leaves some shares of the 40 rows empty
    x, dout = rng.standard_normal((N, C), np.float32), rng.standard_normal((N, OC), np.float32)
    dw = np.full((C, OC), 1.0, np.float32)
    lib.matmul_backward(ffi.NULL, fptr(dw), ffi.NULL, fptr(dout), fptr(x), fptr(w), N, C, OC, 0)
expected = 1.0 + x.T.astype(np.float64) @ dout
print(np.abs(dw - expected).max() / np.abs(expected).max())
"""


def run_script(script, tmp_path, **env):
    """stdout of `python -c script`, run outside the source tree (whose
    sqlgpt/ has no built kernel when the package is installed)."""
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **env},
                          cwd=tmp_path, capture_output=True, text=True, check=True).stdout


def test_split_k_with_more_threads_than_rows_to_share(tmp_path):
    out = run_script(SPLIT_K_MANY_THREADS, tmp_path, OMP_NUM_THREADS="64")
    assert float(out) < TOL


SCRATCH_OF_EXITED_THREADS = """
import os, threading
import numpy as np
from sqlgpt._kernel import lib
from sqlgpt.tensor import fptr
B, T, C, NH = 2, 2048, 256, 4   # attention scratch: about 2.7 MB per thread
q = np.random.default_rng(0).standard_normal((B, T, C), np.float32)
out, lse = np.empty_like(q), np.empty((B, NH, T), np.float32)
def attend():
    lib.attention_forward(fptr(out), fptr(lse), fptr(q), fptr(q), fptr(q), B, T, C, NH)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def in_new_threads(n):
    for _ in range(n):
        t = threading.Thread(target=attend)
        t.start()
        t.join()
in_new_threads(5)
before = rss_mb()
in_new_threads(30)
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer keeps freed memory in quarantine")
def test_scratch_of_exited_threads_is_freed(tmp_path):
    """Each Python thread that runs a kernel gets its own scratch buffers (and
    OpenMP gives it its own pool threads); they must go when the threads do."""
    out = run_script(SCRATCH_OF_EXITED_THREADS, tmp_path)
    assert float(out) < 20  # MB; 125 when they were kept


@pytest.mark.parametrize("N,C,OC", [(7, 13, 29), (64, 128, 512), (33, 700, 50), (7, 700, 29)])
def test_matmul_relu_forward(rng, N, C, OC):
    """The fused fc1 + ReLU; with C = 700 the clamp must wait for the last K
    block (a partial sum may change sign), and with (7, 700, 29) for the
    split-K partial sums to be added."""
    x, w = f32(rng, N, C), f32(rng, C, OC)
    out = f32(rng, N, OC)  # stale values: overwritten
    lib.matmul_relu_forward(fptr(out), fptr(x), fptr(w), N, C, OC)
    ref = torch.relu(t64(x, grad=False) @ t64(w, grad=False))
    assert rel_err(out, ref) < TOL and (out >= 0).all()


@pytest.mark.parametrize("N,C,OC", [(9, 16, 24), (1000, 40, 48)])  # one thread; split-K
def test_matmul_backward_accumulates(rng, N, C, OC):
    x, w, dout = f32(rng, N, C), f32(rng, C, OC), f32(rng, N, OC)
    dx, dw = f32(rng, N, C), f32(rng, C, OC)
    dx0, dw0 = dx.copy(), dw.copy()
    lib.matmul_backward(fptr(dx), fptr(dw), NULL, fptr(dout), fptr(x), fptr(w), N, C, OC, 1)
    assert rel_err(dx - dx0, dout.astype(np.float64) @ w.T) < TOL
    assert rel_err(dw - dw0, x.T.astype(np.float64) @ dout) < TOL
    # without dinp_accumulate dinp is overwritten; weight gradients still add up
    lib.matmul_backward(fptr(dx), fptr(dw), NULL, fptr(dout), fptr(x), fptr(w), N, C, OC, 0)
    assert rel_err(dx, dout.astype(np.float64) @ w.T) < TOL
    assert rel_err(dw - dw0, 2 * (x.T.astype(np.float64) @ dout)) < TOL


@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 8, 2), (2, 17, 32, 4), (3, 64, 128, 8), (1, 100, 48, 3),
                                      (2, 70, 48, 2), (1, 33, 384, 6)])  # head sizes 24, 64
def test_attention(rng, B, T, C, NH):
    q, k, v, dout = (f32(rng, B, T, C) for _ in range(4))
    out, lse = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32)
    lib.attention_forward(fptr(out), fptr(lse), fptr(q), fptr(k), fptr(v), B, T, C, NH)
    tq, tk, tv = t64(q), t64(k), t64(v)
    heads = lambda t: t.view(B, T, NH, C // NH).transpose(1, 2)  # (B, NH, T, hs)
    ref = F.scaled_dot_product_attention(heads(tq), heads(tk), heads(tv), is_causal=True)
    ref = ref.transpose(1, 2).reshape(B, T, C)
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dq, dk, dv = (f32(rng, B, T, C) for _ in range(3))  # stale values: overwritten
    lib.attention_backward(fptr(dq), fptr(dk), fptr(dv), fptr(dout), fptr(q), fptr(k), fptr(v),
                           fptr(out), fptr(lse), B, T, C, NH)
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
        lib.attention_forward(fptr(out), fptr(lse), fptr(q), fptr(k), fptr(v), B, T, C, NH)
        outs.append(out)
        k[:, -1], v[:, -1] = f32(rng, C), f32(rng, C)
    np.testing.assert_array_equal(outs[0][:, :-1], outs[1][:, :-1])
    assert not np.array_equal(outs[0][:, -1], outs[1][:, -1])


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
    dx, dw, db = zeros_like(x), zeros_like(w), zeros_like(b)
    lib.layernorm_backward(fptr(dx), fptr(dw) if affine else NULL, fptr(db) if affine else NULL,
                           fptr(dout), fptr(x), wp, fptr(mean), fptr(rstd), N, C)
    assert rel_err(dx, tx.grad) < TOL
    if affine:
        assert rel_err(dw, tw.grad) < TOL
        assert rel_err(db, tb.grad) < TOL


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


@pytest.mark.parametrize("B,T,C,V", [(1, 1, 4, 3), (4, 33, 64, 50), (2, 256, 128, 428)])
def test_embedding(rng, B, T, C, V):
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    ids[0, : min(T, 3)] = 1  # repeated ids exercise the scatter-add
    wte, wpe, dout = f32(rng, V, C), f32(rng, T + 5, C), f32(rng, B, T, C)
    out = np.zeros((B, T, C), np.float32)
    lib.embedding_forward(fptr(out), iptr(ids), fptr(wte), fptr(wpe), B, T, C)
    twte, twpe = t64(wte), t64(wpe)
    ref = twte[torch.tensor(ids, dtype=torch.long)] + twpe[:T]
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dwte, dwpe = zeros_like(wte), zeros_like(wpe)
    lib.embedding_backward(fptr(dwte), fptr(dwpe), fptr(dout), iptr(ids), B, T, C)
    assert rel_err(dwte, twte.grad) < TOL
    assert rel_err(dwpe, twpe.grad) < TOL


@pytest.mark.parametrize("N,V", [(1, 2), (50, 428), (1000, 65)])
def test_crossentropy(rng, N, V):
    logits = f32(rng, N, V, scale=3.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[:: 3] = 0  # the ignore index (padding)
    if (targets != 0).sum() == 0:
        targets[0] = V - 1
    losses = np.zeros(N, np.float32)
    loss = lib.crossentropy_forward(fptr(losses), fptr(logits), iptr(targets), N, V, 0)
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
    assert lib.crossentropy_forward(fptr(losses), fptr(logits), iptr(targets), 4, 5, 0) == 0.0
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


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_torch(rng, weight_decay):
    n, lr, b1, b2, eps = 5000, 1e-2, 0.9, 0.999, 1e-8
    data = f32(rng, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    tp = torch.nn.Parameter(torch.tensor(data, dtype=torch.float64))
    opt = torch.optim.AdamW([tp], lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    for step in range(1, 6):
        grad = f32(rng, n)
        lib.adamw_update(fptr(data), fptr(grad), fptr(m), fptr(v), n, lr, b1, b2, eps,
                         weight_decay, step)
        tp.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
    assert rel_err(data, tp.detach()) < TOL
    state = opt.state[tp]
    assert rel_err(m, state["exp_avg"]) < TOL
    assert rel_err(v, state["exp_avg_sq"]) < TOL


def test_sum_squares(rng):
    x = f32(rng, 123457)
    assert abs(lib.sum_squares(fptr(x), x.size) - np.sum(x.astype(np.float64) ** 2)) < 1e-9 * x.size
