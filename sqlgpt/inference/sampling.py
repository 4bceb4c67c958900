"""Drawing the next token: the Sampler's settings over the C sampler
(csrc/sample.c, which the loadable extension runs too), numpy's PCG64
stream held for it (Rng), and one sequence's tokens drawn in C a chunk at
a time."""
import numbers
import secrets
from dataclasses import dataclass

import numpy as np

from .._kernel import ffi, lib
from ..errors import SqlgptError
from ..model.model import check_status
from ..model.tensor import aligned_zeros, fptr, iptr

# tokens one sequence draws a C call: a stop string found, or a stream closed,
# costs at most this many steps more
CHUNK = 16


@dataclass
class Sampler:
    """How the next token is drawn from a logits row, in this order:
    repetition_penalty (> 1 makes tokens already in the context less
    likely: positive logits divided by it, negative ones multiplied),
    temperature (0 = greedy), top_k (the k most likely), top_p (the smallest
    set with that much probability), min_p (tokens at least min_p times as
    likely as the most likely one)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = (("temperature", self.temperature, 0, 1e6), ("top_p", self.top_p, 1e-12, 1),
                  ("min_p", self.min_p, 0, 1), ("repetition_penalty", self.repetition_penalty,
                                                1e-6, 1e6))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                    not low <= value <= high:
                low_text = "> 0" if low > 0 and low < 1e-3 else f">= {low}"
                raise SqlgptError(f"{name} must be a number {low_text} and <= {high:g}, "
                                  f"got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or \
                self.top_k < 0:
            raise SqlgptError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        self.top_k = int(self.top_k)

    @property
    def greedy(self):
        return self.temperature == 0

    def _c(self, V):
        """The C sampler's settings and scratch for V ids (made once)."""
        if getattr(self, "_scratch_for", None) != V:
            self._config = ffi.new("SamplerConfig *", (float(self.temperature), float(self.top_p),
                                                       float(self.min_p),
                                                       float(self.repetition_penalty),
                                                       self.top_k))
            self._probs, self._scratch = np.empty(V), np.empty(V)
            self._order = np.empty(V, dtype=np.int32)
            self._scratch_for = V
        return self._config

    def _run(self, kernel_call, logits, context, banned, *rng):
        """kernel_call (sample_token or sampler_probs) on one logits row."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        V = logits.size
        config = self._c(V)
        context = np.ascontiguousarray(context if self.repetition_penalty != 1.0 else (),
                                       dtype=np.int32)
        banned = np.ascontiguousarray(list(banned), dtype=np.int32)
        result = kernel_call(fptr(logits), V, config, iptr(context), context.size, iptr(banned),
                             banned.size, *rng, ffi.cast("double *", self._probs.ctypes.data),
                             ffi.cast("double *", self._scratch.ctypes.data), iptr(self._order))
        if result < 0:
            raise SqlgptError("the model's next-token scores are NaN or all banned: nothing "
                              "to sample from")
        return result

    def probs(self, logits, context=(), banned=()):
        """The distribution the next token is drawn from (float64, V); for
        greedy, all of it on the most likely token."""
        self._run(lib.sampler_probs, logits, context, banned)
        return self._probs.copy()

    def sample(self, logits, rng, context=(), banned=()):
        """One token id from a logits row (V,), drawing from rng (an Rng)."""
        if self.greedy and self.repetition_penalty == 1.0 and not len(banned):
            return int(np.argmax(logits))  # the common fast path: no copies
        return self._run(lib.sample_token, logits, context, banned,
                         rng.state if rng is not None else ffi.NULL)

    def bind(self, decoder, rng, banned=(), eos_id=None):
        """run(token, pos, n, context) -> ids: token in at pos of slot 0 of
        decoder, then each id drawn in at the next position, up to n ids
        (at most CHUNK), in one C call (decode_sample_run: the ids that
        decoder.run then sample give, draw by draw); it ends after eos_id
        and at the context's end. context: the ids the repetition penalty
        reads. Every buffer is made here once."""
        V = decoder.arch.n_vocab
        config = self._c(V)
        banned = np.array(list(banned), dtype=np.int32)
        logits, out = aligned_zeros((V,)), np.empty(CHUNK, dtype=np.int32)
        appended = np.empty(CHUNK, dtype=np.int32)  # the drawn ids, without a penalty
        fixed = (decoder.config, decoder.tensors.struct, decoder.code, decoder.group, decoder._k,
                 decoder._v, 0)
        scratch = (ffi.cast("double *", self._probs.ctypes.data),
                   ffi.cast("double *", self._scratch.ctypes.data), iptr(self._order))
        rng_state = rng.state if rng is not None else ffi.NULL
        pointers = (fptr(logits), config)
        after = (iptr(banned), banned.size, -1 if eos_id is None else eos_id, rng_state, *scratch)
        out_ptr, appended_ptr = iptr(out), iptr(appended)
        seq_len = decoder.arch.seq_len

        def run(token, pos, n, context=()):
            if not (0 <= token < V and 0 <= pos < seq_len and 1 <= n <= CHUNK):
                raise SqlgptError(f"token {token} at position {pos} is outside the model")
            if len(context):
                ids = np.empty(len(context) + n, dtype=np.int32)
                ids[:len(context)] = context
                ids_ptr = iptr(ids)
            else:
                ids_ptr = appended_ptr
            made = lib.decode_sample_run(*fixed, token, pos, *pointers, ids_ptr, len(context),
                                         *after, n, out_ptr)
            if made < 0:
                check_status(-1 - made if made < -1 else 0)
                raise SqlgptError("the model's next-token scores are NaN or all banned: "
                                  "nothing to sample from")
            return out[:made].tolist()
        run.buffers = (banned, logits, out, appended, self._probs, self._scratch, self._order)
        return run

    def sample_rows(self, logits, rngs, contexts, banned=()):
        """One token id for each logits row (n, V), row r drawing from
        rngs[r] with context contexts[r]: greedy picks without a penalty in
        one argmax over all the rows (a batch's per-row Python calls cost a
        few percent of its step)."""
        if self.greedy and self.repetition_penalty == 1.0:
            if len(banned):
                logits = logits.copy()
                logits[:, list(banned)] = -np.inf
            return np.argmax(logits, axis=1).tolist()
        return [self.sample(row, rng, context, banned)
                for row, rng, context in zip(logits, rngs, contexts)]


class Rng:
    """numpy's np.random.default_rng(seed) stream (PCG64), held for the C
    sampler (csrc/sample.c), which draws from it as numpy's Generator does:
    the same seed gives the same tokens in Python and in the extension. No
    seed: fresh entropy."""

    def __init__(self, seed=None):
        self.state = ffi.new("Pcg64 *")
        lib.pcg64_seed(self.state, secrets.randbits(63) if seed is None else seed)

    def random(self):
        """Generator.random(): a float in [0, 1)."""
        return lib.pcg64_random(self.state)

    def choice(self, n, p):
        """Generator.choice(n, p=p): an index drawn by the probabilities p."""
        cumulative = np.array(p, dtype=np.float64)  # the C call sums it in place
        return lib.pcg64_choice(ffi.cast("double *", cumulative.ctypes.data), n, self.state)


def sample(logits, rng, temperature=1.0, top_k=0, top_p=1.0, banned=(), min_p=0.0,
           repetition_penalty=1.0, context=()):
    """One token id from a logits row (V,) (see Sampler)."""
    return Sampler(temperature, top_k, top_p, min_p, repetition_penalty).sample(
        logits, rng, context, banned)


def check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        raise SqlgptError("seed must be an integer from 0 to 2**63-1")


def sequence_rng(seed, index):
    """Sequence index's generator: seed + index, so that a batch's sequence i
    draws what it draws alone with seed + i (no seed: fresh entropy)."""
    return Rng(None if seed is None else (seed + index) % 2**63)
