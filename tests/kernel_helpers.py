"""Shared helpers of the kernel op tests."""
import numpy as np
import torch

from sqlgpt._kernel import ffi

TOL = 1e-5  # every op against float64 PyTorch: relative error below this
NULL = ffi.NULL


def f32(rng, *shape, scale=1.0):
    """Standard-normal float32 values of a shape."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def t64(a, grad=True):
    """A float64 torch tensor of an array (the reference's precision)."""
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def zeros_like(a):
    return np.zeros_like(a, dtype=np.float32)
