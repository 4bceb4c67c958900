"""Integer copies of a model's matrices for decoding: symmetric groups of
32 or 64 values along each matrix's input dimension, one float32 scale
each (llama.cpp's Q8_0 and Q4_0; the layout is csrc/quant.c's). Norms,
biases and the embeddings stay float32, as in those formats; the head (wte
transposed when tied) is quantized like the blocks' matrices.

Quantizing is done here, once, in numpy; the kernel only reads the result
(and quantizes activations, per row and group, as it decodes).
"""
import numpy as np

from .arch import tensor_table
from ..errors import SqlgptError

BITS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64)
DEFAULT_GROUP = 32


def matrices(arch):
    """The tensor table's rows that are quantized: every matrix but the
    embeddings (a tied head included: it is wte transposed)."""
    return [s for s in tensor_table(arch) if len(s.shape) == 2 and s.name not in ("wte", "wpe")]


def check_group(arch, group):
    """A one-line error unless every quantized matrix's input width is a
    multiple of group."""
    if group not in GROUP_SIZES:
        raise SqlgptError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                          f"got {group!r}")
    for spec in matrices(arch):
        if spec.shape[0] % group:
            raise SqlgptError(f"--group-size {group} does not divide {spec.name}'s input "
                              f"width {spec.shape[0]}")


def quantize(w, bits, group):
    """W (C, OC) float32 -> (q (OC, row bytes) uint8, scales (OC, C/group)
    float32), the rows of the kernel's layout."""
    C, OC = w.shape
    groups = np.asarray(w, dtype=np.float64).T.reshape(OC, C // group, group)
    if bits == 8:
        d = np.abs(groups).max(axis=2) / 127.0
        q = np.rint(groups / np.where(d > 0, d, 1)[..., None]).clip(-127, 127).astype(np.int8)
        return q.reshape(OC, C).view(np.uint8), d.astype(np.float32)
    # int4: d = m / -8 for m the value of largest magnitude, q in [-8, 7]
    index = np.abs(groups).argmax(axis=2)
    m = np.take_along_axis(groups, index[..., None], axis=2)[..., 0]
    d = m / -8.0
    q = np.rint(groups / np.where(d != 0, d, 1)[..., None]).clip(-8, 7).astype(np.int16) + 8
    blocks = q.reshape(OC, C // 32, 32)  # nibbles pair elements k, k + 16 of each 32
    packed = (blocks[..., :16] | (blocks[..., 16:] << 4)).astype(np.uint8)
    return packed.reshape(OC, C // 2), d.astype(np.float32)


def dequantize_rows(q, scales, C, bits, group, chunk=4096):
    """The float32 rows (OC, C) that quantized rows stand for (W transposed),
    made a chunk of rows at a time: no temporaries the size of W."""
    out = np.empty((q.shape[0], C), dtype=np.float32)
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        out[rows] = dequantize(q[rows], scales[rows], C, bits, group).T
    return out


def dequantize(q, scales, C, bits, group):
    """The float32 W (C, OC) that quantized rows (q, scales) stand for."""
    OC = q.shape[0]
    if bits == 8:
        values = q.view(np.int8).reshape(OC, C // group, group).astype(np.float32)
    else:
        packed = q.reshape(OC, C // 32, 16)
        values = np.concatenate([(packed & 0x0F), (packed >> 4)], axis=2).astype(np.float32) - 8
        values = values.reshape(OC, C // group, group)
    return (values * scales[..., None]).reshape(OC, C).T.copy()


def quantized_copy(arch, weights, bits, group):
    """{name: (q, scales)} of every quantized matrix of a model whose
    weights are {name: float32 array} (a tied head from wte)."""
    check_group(arch, group)
    return {spec.name: quantize(weights[spec.tied_to].T if spec.tied_to else weights[spec.name],
                                bits, group)
            for spec in matrices(arch)}


class Quantized(tuple):
    """One matrix's integer rows, (q (OC, row bytes) uint8, scales (OC,
    C/group) float32), as views of `block`: the one buffer in kernel_block's
    layout, which a Decoder arranges in place for its kernel (quant_arrange;
    `arranged` is then set, and the views no longer hold rows)."""

    @classmethod
    def empty(cls, C, OC, bits, group):
        row, groups = C * bits // 8, C // group
        block = np.zeros(-(-(OC * row + 4 * OC * groups) // 4), dtype=np.float32)
        raw = block.view(np.uint8)
        matrix = cls((raw[:OC * row].reshape(OC, row),
                      raw[OC * row:OC * (row + 4 * groups)].view(np.float32).reshape(OC, groups)))
        matrix.block = block
        return matrix


def kernel_block(q, scales):
    """One matrix's rows as the kernel takes them: every row's values, then
    every row's scales, in one buffer (float32-aligned for the kernel's
    pointer); a Decoder arranges it for its kernel (quant_arrange)."""
    values = q.size  # bytes
    out = np.zeros(-(-(values + 4 * scales.size) // 4), dtype=np.float32)
    raw = out.view(np.uint8)
    raw[:values] = q.reshape(-1).view(np.uint8)
    raw[values:values + 4 * scales.size] = \
        np.ascontiguousarray(scales, dtype="<f4").reshape(-1).view(np.uint8)
    return out

