"""sqlgpt's matmul against numpy's BLAS on one config's matrix shapes:
GFLOP/s of the forward product, dinp and dweight, each side timed on its own
(a BLAS pool that has just worked keeps spinning and would slow the other).

    python benchmarks/matmul_shapes.py [a config of bench.py: lua, baby, gpt2-small, ...]
"""
import sys
import time

import numpy as np

from bench import CONFIGS, architecture
from sqlgpt._kernel import ffi, lib
from sqlgpt.model.arch import tensor_table
from sqlgpt.model.tensor import fptr

REPEATS = 15
POOL_IDLE_S = 0.5


def median_s(fn):
    fn()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def products(x, w, dout, out, dx, dw):
    """(name, sqlgpt call, numpy call) for the three products of one matmul."""
    N, C = x.shape
    OC = w.shape[1]
    return [("forward", lambda: lib.matmul_forward(fptr(out), fptr(x), fptr(w), ffi.NULL, N, C, OC),
             lambda: np.matmul(x, w, out=out)),
            ("dinp", lambda: lib.matmul_backward(fptr(dx), ffi.NULL, ffi.NULL, fptr(dout), fptr(x),
                                                 fptr(w), N, C, OC, 0),
             lambda: np.matmul(dout, w.T, out=dx)),
            ("dweight", lambda: lib.matmul_backward(ffi.NULL, fptr(dw), ffi.NULL, fptr(dout),
                                                    fptr(x), fptr(w), N, C, OC, 0),
             lambda: np.matmul(x.T, dout, out=dw))]


def main(name):
    arch = architecture(CONFIGS[name])
    N = CONFIGS[name]["batch_size"] * arch.seq_len
    shapes = {}  # every distinct matrix shape of the tensor table, named by its components
    for spec in tensor_table(arch):
        if len(spec.shape) == 2 and spec.name not in ("wte", "wpe") and spec.layer in (0, None):
            shapes.setdefault(spec.shape, []).append(spec.component)
    shapes = {", ".join(names): shape for shape, names in shapes.items()}
    rng = np.random.default_rng(0)
    rows = []
    for label, (c, oc) in shapes.items():
        x, w, dout = (rng.standard_normal(s, dtype=np.float32) for s in ((N, c), (c, oc), (N, oc)))
        out, dx, dw = np.empty((N, oc), np.float32), np.empty_like(x), np.zeros_like(w)
        for product, ours, blas in products(x, w, dout, out, dx, dw):
            ours_s = median_s(ours)
            time.sleep(POOL_IDLE_S)
            blas_s = median_s(blas)
            time.sleep(POOL_IDLE_S)
            flops = 2 * N * c * oc
            rows.append((f"{label} {c}x{oc}", product, flops / ours_s / 1e9, flops / blas_s / 1e9))
    print(f"{name}: {N} tokens, GFLOP/s, sqlgpt vs numpy ({np.__version__})")
    for shape, product, ours, blas in rows:
        print(f"  {shape:22s} {product:8s} {ours:6.0f} {blas:6.0f}  {ours / blas:5.2f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lua")
