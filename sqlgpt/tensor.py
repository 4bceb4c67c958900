"""Parameter tensors: each owns `data`, `grad`, `m`, `v` (the original's four
buffers), as zero-copy numpy views into four flat float32 arenas, so the
optimizer updates every parameter with one kernel call and I/O sees plain arrays.
"""
from math import prod

import numpy as np

from ._kernel import ffi

BUFFERS = ("data", "grad", "m", "v")


def fptr(array):
    """float* to a contiguous float32 numpy array (no copy)."""
    return ffi.from_buffer("float[]", array)


def iptr(array):
    """int* to a contiguous int32 numpy array (no copy)."""
    return ffi.from_buffer("int[]", array)


class Tensor:
    """One parameter: a name, a shape and four views of the same size."""

    def __init__(self, name, shape, arenas, offset):
        self.name = name
        self.shape = tuple(shape)
        size = prod(self.shape)
        for buf in BUFFERS:
            setattr(self, buf, arenas[buf][offset:offset + size].reshape(self.shape))

    def __repr__(self):
        return f"Tensor({self.name!r}, shape={self.shape})"


class ParameterSet:
    """All parameters of a model in four flat arenas, in a fixed order."""

    def __init__(self, specs):
        """specs: list of (name, shape), in storage order."""
        total = sum(prod(shape) for _, shape in specs)
        self.arenas = {buf: np.zeros(total, dtype=np.float32) for buf in BUFFERS}
        self.tensors = {}
        offset = 0
        for name, shape in specs:
            self.tensors[name] = Tensor(name, shape, self.arenas, offset)
            offset += prod(shape)
        self.size = total

    def __getitem__(self, name):
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors.values())

    def zero_grad(self):
        self.arenas["grad"].fill(0.0)
