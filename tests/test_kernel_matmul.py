"""matmul.c against float64 PyTorch on fresh random inputs (relative error below 1e-5),
and its thread and scratch behaviour."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sqlgpt._kernel import lib
from sqlgpt.model.tensor import fptr

from helpers import rel_err
from kernel_helpers import NULL, TOL, f32, t64, zeros_like


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
from sqlgpt.model.tensor import fptr
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
from sqlgpt.model.tensor import fptr
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
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_relu_forward(rng, N, C, OC, with_bias):
    """The fused fc1 + ReLU; with C = 700 the clamp must wait for the last K
    block (a partial sum may change sign), and with (7, 700, 29) for the
    split-K partial sums to be added; a bias is added before the clamp."""
    x, w, b = f32(rng, N, C), f32(rng, C, OC), f32(rng, OC, scale=5.0)
    out = f32(rng, N, OC)  # stale values: overwritten
    lib.matmul_relu_forward(fptr(out), fptr(x), fptr(w), fptr(b) if with_bias else NULL,
                            N, C, OC)
    ref = torch.relu(t64(x, grad=False) @ t64(w, grad=False) + (t64(b, False) if with_bias else 0))
    assert rel_err(out, ref) < TOL and (out >= 0).all()


@pytest.mark.parametrize("N,C,V", [(1, 8, 5), (40, 32, 101), (300, 64, 428), (1000, 48, 65)])
def test_tied_head_matmul(rng, N, C, V):
    """logits = x @ wte^T and its gradients (dwte accumulates, dinp is written)."""
    x, wte, dout = f32(rng, N, C), f32(rng, V, C), f32(rng, N, V)
    out = f32(rng, N, V)
    lib.matmul_t_forward(fptr(out), fptr(x), fptr(wte), N, C, V)
    tx, tw = t64(x), t64(wte)
    ref = tx @ tw.T
    assert rel_err(out, ref.detach()) < TOL
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    dx, dwte = f32(rng, N, C), f32(rng, V, C)
    dwte0 = dwte.copy()
    lib.matmul_t_backward(fptr(dx), fptr(dwte), fptr(dout), fptr(x), fptr(wte), N, C, V)
    assert rel_err(dx, tx.grad) < TOL
    assert rel_err(dwte - dwte0, tw.grad) < TOL


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


