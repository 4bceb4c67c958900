"""Sampling the next token and generating text from a trained model.

Generation runs each token through the whole model in one kernel call
(decode_step) with a KV cache, so a token costs one Python -> C crossing.
"""
import numpy as np

from ._kernel import ffi, lib
from .errors import SqlgptError
from .model import LAYER_COMPONENTS, LN_EPS
from .tensor import ALIGN_FLOATS, aligned_zeros, fptr


PRECISIONS = ("fp32", "bf16")


def check_precision(precision):
    if precision not in PRECISIONS:
        raise SqlgptError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


class Decoder:
    """A snapshot of a model's weights in the layout the C decode step reads
    (column panels, packed once here), plus its KV cache: values
    (num_layers, seq_len, C), keys in the kernel's transposed layout. Later
    changes to the model's weights are not seen: make a new Decoder after
    training further.

    precision "bf16" rounds the matrices to bfloat16 (8 significant bits) for
    decoding: half the memory to stream per token, logits within about 1e-2
    of float32's; wte, wpe, activations and sums stay float32."""

    def __init__(self, model, precision="fp32"):
        check_precision(precision)
        cfg = model.cfg
        self.cfg, self.precision, self.pos = cfg, precision, 0
        self.vcache = aligned_zeros((cfg.num_layers, cfg.seq_len, cfg.embed_dim))
        self.logits = aligned_zeros((cfg.n_classes,))
        p = model.params
        packed = ["head"] + [f"layers.{l}.{comp}" for comp in LAYER_COMPONENTS
                             for l in range(cfg.num_layers)]
        bf16 = precision == "bf16"
        # panel sizes in float32 slots, each rounded up to keep panels 64-byte aligned
        slots = [-(-lib.panels_size(*p[name].shape) // (2 if bf16 else 1) // ALIGN_FLOATS)
                 * ALIGN_FLOATS for name in packed]
        self.panels = aligned_zeros((sum(slots),))
        base, ptrs, offset = fptr(self.panels), {}, 0
        for name, size in zip(packed, slots):
            ptrs[name] = base + offset
            lib.pack_panels(ptrs[name], fptr(p[name].data), *p[name].shape, bf16)
            offset += size
        self._keep = [base]  # cdata that must outlive the struct
        desc = ffi.new("DecodeModel *")
        desc.num_layers, desc.C, desc.NH = cfg.num_layers, cfg.embed_dim, cfg.num_heads
        desc.V, desc.max_T, desc.ln_eps, desc.bf16 = cfg.n_classes, cfg.seq_len, LN_EPS, bf16
        self.wte, self.wpe = p["wte"].data.copy(), p["wpe"].data.copy()  # the snapshot
        desc.wte, desc.wpe, desc.head = self._ptr(self.wte), self._ptr(self.wpe), ptrs["head"]
        for comp in LAYER_COMPONENTS:
            array = ffi.new("const void *[]", [ptrs[f"layers.{l}.{comp}"]
                                               for l in range(cfg.num_layers)])
            self._keep.append(array)
            setattr(desc, comp, array)
        self.desc = desc
        self.kcache = aligned_zeros((lib.key_cache_size(desc),))
        self._k, self._v, self._out = fptr(self.kcache), fptr(self.vcache), fptr(self.logits)

    def _ptr(self, array):
        ptr = fptr(array)
        self._keep.append(ptr)
        return ptr

    def reset(self):
        self.pos = 0

    def step(self, token):
        """Logits (V,) for the next token after `token` at the next position."""
        if self.pos >= self.cfg.seq_len:
            raise SqlgptError("the KV cache is full")
        if not 0 <= token < self.cfg.n_classes:
            raise SqlgptError(f"token id {token} out of range")
        lib.decode_step(self.desc, self._k, self._v, token, self.pos, self._out)
        self.pos += 1
        return self.logits

    def prefill(self, ids):
        """Run a context through the cache from position 0; logits after its last token."""
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
    T = decoder.cfg.seq_len
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
