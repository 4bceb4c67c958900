"""Sampling the next token and generating text from a trained model.

Generation runs each token through the whole model in one kernel call
(decode_step) with a KV cache, so a token costs one Python -> C crossing.
"""
import numpy as np

from ._kernel import lib
from .arch import tensor_table
from .errors import SqlgptError
from .model import TensorStruct, check_status, model_config, tensor_fields
from .tensor import ALIGN_FLOATS, aligned_zeros, fptr


PRECISIONS = ("fp32", "bf16")


def check_precision(precision):
    if precision not in PRECISIONS:
        raise SqlgptError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


class Decoder:
    """A snapshot of a model's weights in the layout the C decode step reads
    (every matrix as column panels, packed once here; a tied head is wte
    transposed), plus its KV cache: values (num_layers, seq_len, kv_dim),
    keys in the kernel's transposed layout. Later changes to the model's
    weights are not seen: make a new Decoder after training further.

    precision "bf16" rounds the matrices to bfloat16 (8 significant bits) for
    decoding: half the memory to stream per token, logits within about 1e-2
    of float32's; embeddings, norms, biases, activations and sums stay float32."""

    def __init__(self, model, precision="fp32"):
        check_precision(precision)
        arch = model.arch
        self.arch, self.precision, self.pos = arch, precision, 0
        self.bf16 = precision == "bf16"
        self.vcache = aligned_zeros((arch.num_layers, arch.seq_len, arch.kv_dim))
        self.logits = aligned_zeros((arch.n_vocab,))
        arrays = self._snapshot(model)
        self.config = model_config(arch)
        self.tensors = TensorStruct(arch.num_layers,
                                    *tensor_fields(arch, arrays, model.weights_fixed))
        self.kcache = aligned_zeros((lib.key_cache_size(self.config),))
        self._k, self._v, self._out = fptr(self.kcache), fptr(self.vcache), fptr(self.logits)

    def _snapshot(self, model):
        """{name: array} for the decode struct: matrices packed into panels
        (one aligned block), everything else copied as float32."""
        arrays, matrices = {}, {}
        for spec in tensor_table(model.arch):
            data = model.params[spec.tied_to or spec.name].data
            if spec.tied_to:
                data = np.ascontiguousarray(data.T)  # the head reads wte transposed
            if len(spec.shape) == 2 and spec.name not in ("wte", "wpe"):
                matrices[spec.name] = data
            else:
                arrays[spec.name] = data.copy()
        # panel sizes in float32 slots, each rounded up to keep panels 64-byte aligned
        slots = [-(-lib.panels_size(*m.shape) // (2 if self.bf16 else 1) // ALIGN_FLOATS)
                 * ALIGN_FLOATS for m in matrices.values()]
        self.panels = aligned_zeros((sum(slots),))
        offset = 0
        for (name, matrix), size in zip(matrices.items(), slots):
            arrays[name] = self.panels[offset:offset + size]
            lib.pack_panels(fptr(arrays[name]), fptr(matrix), *matrix.shape, self.bf16)
            offset += size
        return arrays

    def reset(self):
        self.pos = 0

    def step(self, token):
        """Logits (V,) for the next token after `token` at the next position."""
        if self.pos >= self.arch.seq_len:
            raise SqlgptError("the KV cache is full")
        if not 0 <= token < self.arch.n_vocab:
            raise SqlgptError(f"token id {token} out of range")
        check_status(lib.decode_step(self.config, self.tensors.struct, self.bf16, self._k,
                                     self._v, token, self.pos, self._out))
        self.pos += 1
        return self.logits

    def prefill(self, ids):
        """Run a context through the cache from position 0; logits after its last token."""
        if len(ids) == 0:
            raise SqlgptError("the context is empty: generation needs at least one token")
        self.reset()
        for token in ids:
            logits = self.step(int(token))
        return logits


def sample(logits, rng, temperature=1.0, top_k=0, top_p=1.0, banned=()):
    """One token id from a logits row (V,): temperature 0 is greedy; top_k keeps
    the k most likely; top_p keeps the smallest set with that much probability."""
    if temperature <= 0:  # the common fast path: no float64 copy, no softmax
        if banned:
            logits = logits.copy()
            logits[list(banned)] = -np.inf
        return int(np.argmax(logits))
    logits = np.asarray(logits, dtype=np.float64).copy()
    logits[list(banned)] = -np.inf
    logits = (logits - logits.max()) / temperature  # max first: a tiny temperature gives -inf, not nan
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def generate_ids(decoder, prompt_ids, max_tokens, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, banned=()):
    """Yield max_tokens sampled ids after prompt_ids from a Decoder (its KV
    cache is reset first), in eval mode. The context is at most seq_len
    tokens; when it fills, it restarts from the last half."""
    if max_tokens < 0:
        raise SqlgptError("max_tokens must be >= 0")
    if temperature < 0:
        raise SqlgptError("temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise SqlgptError("top_p must be in (0, 1]")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise SqlgptError("seed must be an integer from 0 to 2**63-1")
    rng = np.random.default_rng(seed)
    context = [int(i) for i in prompt_ids]
    T = decoder.arch.seq_len
    logits = decoder.prefill(context[-T:])
    for _ in range(max_tokens):
        token = sample(logits, rng, temperature, top_k, top_p, banned)
        context.append(token)
        yield token
        if decoder.pos == T:
            # learned positions stop at seq_len: slide the window by half of it
            logits = decoder.prefill(context[-max(1, T // 2):])
        else:
            logits = decoder.step(token)
