"""The decode step's side of generation: a snapshot of a model's weights
in the layout the C decode step reads, with a KV cache per sequence, and
one batched step over them."""
import copy

import numpy as np

from .. import contract
from .._kernel import ffi, lib
from ..errors import SqlgptError
from ..model.arch import tensor_table
from ..model.lora import merged
from ..model.model import TensorStruct, check_status, model_config, tensor_fields
from ..model.quant import BITS, check_group, kernel_block
from ..model.tensor import ALIGN_FLOATS, aligned_zeros, fptr

PRECISIONS = contract.PRECISIONS
PRECISION_CODES = {name: code for code, name in enumerate(PRECISIONS)}  # the kernel's PRECISION_*


def check_precision(precision):
    if precision not in PRECISIONS:
        raise SqlgptError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


class Decoder:
    """A snapshot of a model's weights in the layout the C decode step reads
    (every matrix as column panels, packed once here; a tied head is wte
    transposed), plus a KV cache for each of `slots` sequences: values
    (num_layers, kv_heads, seq_len, head_dim) per slot, keys in the kernel's
    blocked layout. Later changes to the model's weights are not seen: make a new
    Decoder after training further.

    precision "bf16" rounds the matrices to bfloat16 (8 significant bits) for
    decoding: half the memory to stream per token, logits within about 1e-2
    of float32's; "f16" to IEEE half (11 significant bits: exact for an F16
    or BF16 import's values, which came from half); embeddings, norms, biases, activations and sums stay float32.
    "int8" and "int4" decode from quantized copies of the matrices
    (quantized: {name: (q, scales)} as sqlgpt.model.quant makes them, in groups
    of `group`), with integer dot products against activations quantized
    per group.

    weights: where the tensors come from ({name: float32 array}; a mapping
    that reads each when asked, as store.StoredTensors does, keeps only the
    decoder's copy and the tensor in hand in memory); by default the
    model's own, a fine-tune's adapters folded in."""

    def __init__(self, model, precision="fp32", slots=1, quantized=None, group=0, weights=None):
        check_precision(precision)
        arch = model.arch
        self.arch, self.precision, self.pos, self.slots = arch, precision, 0, slots
        self.half = lib.panel_half(PRECISION_CODES[precision])
        self.code, self.group = PRECISION_CODES[precision], group
        if precision in BITS and not quantized:
            raise SqlgptError(f"{precision} decoding needs the model's {precision} weights "
                              f"(sqlgpt quantize)")
        if precision in BITS:
            check_group(arch, group)  # the kernel divides by it and reads groups of it
        fresh = weights is not None  # arrays read for the decoder alone: kept, not copied
        arrays = self._snapshot(arch, merged(model) if weights is None else weights,
                                quantized if precision in BITS else None, fresh)
        self.config = model_config(arch)
        self._drop_held_wte(arrays)
        self.tensors = TensorStruct(arch.num_layers,
                                    *tensor_fields(arch, arrays, model.weights_fixed))
        self.grow(slots)
        self.logits = aligned_zeros((1, arch.n_vocab))

    def _snapshot(self, arch, weights, quantized, fresh):
        """{name: array} for the decode struct: matrices packed into panels
        (one aligned block, each matrix read and packed in turn) or their
        quantized rows, everything else as float32."""
        specs = tensor_table(arch)
        packed = [spec for spec in specs if len(spec.shape) == 2 and
                  spec.name not in ("wte", "wpe") and not (quantized and spec.name in quantized)]
        # panel sizes in float32 slots, each rounded up to keep panels 64-byte aligned
        sizes = [-(-lib.panels_size(*spec.shape) // (2 if self.half else 1) // ALIGN_FLOATS)
                 * ALIGN_FLOATS for spec in packed]
        self.panels = aligned_zeros((sum(sizes),))
        offsets = dict(zip((spec.name for spec in packed), np.cumsum([0] + sizes).tolist()))
        arrays = {}
        # wte kept in the head's own format (an import's) is the head's values: not read
        unread = {"wte"} if getattr(weights, "held_by_head", lambda _: False)(self.precision) \
            else set()
        for spec, size in zip(packed, sizes):
            arrays[spec.name] = self.panels[offsets[spec.name]:offsets[spec.name] + size]
        for spec in specs:
            if quantized and spec.name in quantized:
                arrays[spec.name] = self._arranged(quantized[spec.name], *spec.shape)
                continue
            if spec.name in unread:
                continue
            if spec.name in offsets:
                self._pack(spec, weights, arrays[spec.name])
                continue
            data = weights[spec.tied_to or spec.name]
            arrays[spec.name] = data if fresh else data.copy()
        return arrays

    def _pack(self, spec, weights, panels):
        """spec's matrix into its panels (a tied head: wte transposed): from
        an F16 import's halves where the store gives them (no float32 copy
        of the tensor is made), else from float32."""
        source, transposed = spec.tied_to or spec.name, bool(spec.tied_to)
        read_halves = getattr(weights, "halves", None)
        halves = read_halves(source) if read_halves else None
        if halves is not None:
            lib.pack_panels_f16(fptr(panels), ffi.from_buffer(halves), *spec.shape, self.half,
                                transposed)
            return
        pack = lib.pack_panels_t if transposed else lib.pack_panels
        pack(fptr(panels), fptr(weights[source]), *spec.shape, self.half)

    def _arranged(self, matrix, C, OC):
        """A quantized matrix's block in the kernel's arranged layout
        (quant_arrange). A Quantized read for the decoder (its .block) is
        handed over and arranged in place: its q and scales views no longer
        hold rows after."""
        block = getattr(matrix, "block", None)
        if block is None:
            block = kernel_block(*matrix)
        elif getattr(matrix, "arranged", False):
            return block
        check_status(lib.quant_arrange(fptr(block), C, OC, BITS[self.precision], self.group))
        if hasattr(matrix, "block"):
            matrix.arranged = True
        return block

    def _drop_held_wte(self, arrays):
        """A tied model's head holds wte: where it holds it exactly (always
        in float32; in half or integers when wte's values are those, as an
        import's are), tokens are looked up in the head and the second copy,
        V x C floats, is dropped."""
        if "head" not in arrays or "wte" not in arrays or \
                not any(spec.tied_to for spec in tensor_table(self.arch)):
            return
        if lib.head_holds_wte(self.config, fptr(arrays["head"]), self.code, self.group,
                              fptr(arrays["wte"])):
            del arrays["wte"]

    def run(self, slots, tokens, positions, out_rows):
        """One batched step: row r is token tokens[r] at position positions[r]
        of the sequence in cache slot slots[r] (a slot's rows at consecutive
        positions, after the positions it already holds). Returns the logits
        (len(out_rows), V) of the rows out_rows (a view, valid until the next
        call)."""
        n, V = len(tokens), self.arch.n_vocab
        if not n or not out_rows:
            raise SqlgptError("a decode step needs at least one token and one row of logits")
        if len(slots) != n or len(positions) != n:
            raise SqlgptError("a decode step needs a slot and a position for every token")
        if not all(0 <= s < self.slots for s in slots):
            raise SqlgptError(f"cache slots run from 0 to {self.slots - 1}")
        if len(out_rows) > n or not all(0 <= r < n for r in out_rows):
            raise SqlgptError(f"rows of logits must be among the step's {n} rows")
        for token in tokens:
            if not 0 <= token < V:
                raise SqlgptError(f"token id {token} out of range")
        for pos in positions:
            if not 0 <= pos < self.arch.seq_len:
                raise SqlgptError("the KV cache is full")
        if len(out_rows) > self.logits.shape[0]:
            self.logits = aligned_zeros((len(out_rows), V))
        check_status(lib.decode_batch(
            self.config, self.tensors.struct, self.code, self.group, self._k, self._v, n,
            ffi.new("int[]", list(slots)), ffi.new("int[]", list(tokens)),
            ffi.new("int[]", list(positions)), len(out_rows), ffi.new("int[]", list(out_rows)),
            fptr(self.logits)))
        return self.logits[:len(out_rows)]

    def fork(self, slots=1):
        """A Decoder on the same packed weights with KV caches of its own for
        `slots` sequences: generations that run side by side (two suspended
        streams, a batch beside a stream) never share a cache."""
        other = copy.copy(self)
        other.grow(slots)
        other.pos = 0
        other.logits = aligned_zeros((1, self.arch.n_vocab))
        return other

    def grow(self, slots):
        """KV caches for `slots` sequences (what the slots held is dropped)."""
        arch = self.arch
        self.slots = slots
        self.vcache = aligned_zeros((slots, arch.num_layers, arch.n_kv_heads, arch.seq_len,
                                     arch.head_dim))
        self.kcache = aligned_zeros((slots * lib.key_cache_size(self.config),))
        self._k, self._v = fptr(self.kcache), fptr(self.vcache)

    def reorder(self, parents):
        """Slot i's caches become those slot parents[i] held (a beam search's
        survivors, each continuing a parent's sequence)."""
        parents = np.asarray(parents, dtype=np.int64)
        if (parents == np.arange(len(parents))).all():
            return
        self.vcache[:len(parents)] = self.vcache[parents]
        keys = self.kcache.reshape(self.slots, -1)
        keys[:len(parents)] = keys[parents]

    def reset(self):
        self.pos = 0

    def step(self, token):
        """Logits (V,) for the next token after `token` at the next position (slot 0)."""
        if not 0 <= token < self.arch.n_vocab:
            raise SqlgptError(f"token id {token} out of range")
        logits = self.run([0], [token], [self.pos], [0])[0]
        self.pos += 1
        return logits

    def prefill(self, ids):
        """Run a context through slot 0's cache from position 0, in one step;
        the logits after its last token."""
        if len(ids) == 0:
            raise SqlgptError("the context is empty: generation needs at least one token")
        ids = [int(i) for i in ids]
        logits = self.run([0] * len(ids), ids, range(len(ids)), [len(ids) - 1])[0]
        self.pos = len(ids)
        return logits
