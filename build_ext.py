"""CFFI builder for the sqlgpt C kernel (csrc/), run by `pip install`.

The kernel is compiled for the machine it is installed on (-march=native) with
OpenMP, so both cores are used and the SIMD width fits the CPU. Set
SQLGPT_PORTABLE=1 to build for a generic x86-64/ARM target instead, and
SQLGPT_SANITIZE=1 for an AddressSanitizer/UBSan build.
"""
import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["scratch.c", "matmul.c", "attention.c", "norm.c", "rope.c", "activation.c",
           "embedding.c", "loss.c", "dropout.c", "optim.c", "checksum.c", "model.c", "decode.c",
           "quant.c"]


def compile_flags():
    # -fno-trapping-math: nothing here enables floating-point traps, and without
    # it GCC will not if-convert a clamp next to a float-to-int conversion on
    # targets without AVX-512 masks, so fast_expf's loops (softmax, the loss)
    # stayed scalar on AVX2
    flags = ["-O3", "-fopenmp", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math"]
    if not os.environ.get("SQLGPT_PORTABLE"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    if os.environ.get("SQLGPT_SANITIZE"):
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    return flags


ffibuilder = FFI()
ffibuilder.cdef((CSRC / "sqlgpt.h").read_text())
ffibuilder.set_source(
    "sqlgpt._kernel",
    '#include "sqlgpt.h"',
    sources=[str((CSRC / name).relative_to(ROOT)) for name in SOURCES],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=compile_flags(),
    extra_link_args=["-fopenmp"] + (["-fsanitize=address,undefined"]
                                    if os.environ.get("SQLGPT_SANITIZE") else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
