"""Parameter tensors: each owns `data`, `grad`, `m`, `v` (the original's four
buffers), as zero-copy numpy views into four flat float32 arenas, so the
optimizer updates every parameter with one kernel call and I/O sees plain arrays.
"""
from math import prod

import numpy as np

from .._kernel import ffi, lib

BUFFERS = ("data", "grad", "m", "v")
# Buffers start on 64-byte boundaries (a cache line, one AVX-512 register):
# numpy's large arrays start 16 bytes past a page, and misaligned vector loads
# cost the matmul about a third of its speed.
ALIGN_FLOATS = 16


def aligned_zeros(shape):
    """A zeroed float32 array whose data starts on a 64-byte boundary."""
    size = prod(shape)
    raw = np.zeros(size + ALIGN_FLOATS, dtype=np.float32)
    start = (-raw.ctypes.data // 4) % ALIGN_FLOATS
    return raw[start:start + size].reshape(shape)


def _aligned_offsets(specs):
    """Start of each tensor in an arena (a multiple of ALIGN_FLOATS), the
    arena size, and where the tensors without weight decay begin: those come
    last, so that each decay group is one contiguous run for the optimizer."""
    offsets, offset = {}, 0
    for decay in (True, False):
        if not decay:
            no_decay_start = offset
        for spec in specs:
            if spec.decay == decay:
                offsets[spec.name] = offset
                offset += -(-prod(spec.shape) // ALIGN_FLOATS) * ALIGN_FLOATS
    return offsets, offset, no_decay_start


def fptr(array):
    """float* to a contiguous float32 numpy array (no copy)."""
    return ffi.from_buffer("float[]", array)


def zero(array):
    """array[...] = 0 on every core (a contiguous float32 array)."""
    lib.zero_floats(fptr(array), array.size)


def iptr(array):
    """int* to a contiguous int32 numpy array (no copy)."""
    return ffi.from_buffer("int[]", array)


class Tensor:
    """One parameter: its row of the tensor table and four views of its shape."""

    def __init__(self, spec, arenas, offset):
        self.spec, self.name, self.shape = spec, spec.name, tuple(spec.shape)
        size = prod(self.shape)
        for buf in arenas:
            setattr(self, buf, arenas[buf][offset:offset + size].reshape(self.shape))

    def __repr__(self):
        return f"Tensor({self.name!r}, shape={self.shape})"


class ParameterSet:
    """All parameters of a model in four flat arenas, each tensor starting on
    a 64-byte boundary; iteration is in the tensor table's order."""

    def __init__(self, specs, buffers=BUFFERS):
        """specs: the tensor table's rows that own storage (arch.stored_tensors);
        buffers: which of BUFFERS to allocate (("data",) for frozen weights)."""
        offsets, total, self.no_decay_start = _aligned_offsets(specs)
        # the gaps between tensors stay zero: Adam leaves zeros with zero gradients alone
        self.arenas = {buf: aligned_zeros((total,)) for buf in buffers}
        self.tensors = {spec.name: Tensor(spec, self.arenas, offsets[spec.name])
                        for spec in specs}
        self.size = sum(prod(spec.shape) for spec in specs)  # parameters, gaps excluded

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors.values())

    def zero_grad(self):
        zero(self.arenas["grad"])

    def scale_grad(self, factor, span=None):
        """grad *= factor over every parameter (clipping, accumulation), or
        over the arena's span (start, stop)."""
        g = self.arenas["grad"][slice(*span) if span else slice(None)]
        lib.scale_inplace(fptr(g), g.size, factor)
