"""Sampling the next token and generating text from a trained model.

Generation runs tokens through the whole model in one kernel call
(decode_batch) with a KV cache per sequence: a prompt's tokens go in one
call, and the sequences of a batch share every step, so each weight is read
once for all of them. Speculative decoding lets a small draft model propose
tokens that the target checks in one such step.
"""
import copy
import numbers
import secrets
from dataclasses import dataclass

import numpy as np

from .._kernel import ffi, lib
from ..model.arch import tensor_table
from ..errors import SqlgptError
from ..model.lora import merged
from ..model.quant import BITS, check_group, kernel_block
from ..model.model import TensorStruct, check_status, model_config, tensor_fields
from ..model.tensor import ALIGN_FLOATS, aligned_zeros, fptr, iptr


PRECISIONS = ("fp32", "bf16", "int8", "int4")
PRECISION_CODES = {"fp32": lib.PRECISION_FP32, "bf16": lib.PRECISION_BF16,
                   "int8": lib.PRECISION_INT8, "int4": lib.PRECISION_INT4}
MAX_BATCH = 256    # sequences generated together (each holds a KV cache)
DRAFT_TOKENS = 4   # tokens a draft model proposes per verification step
# tokens one sequence draws a C call: a stop string found, or a stream closed,
# costs at most this many steps more
CHUNK = 16


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
    of float32's; embeddings, norms, biases, activations and sums stay float32.
    "int8" and "int4" decode from quantized copies of the matrices
    (quantized: {name: (q, scales)} as sqlgpt.model.quant makes them, in groups
    of `group`), with integer dot products against activations quantized
    per group."""

    def __init__(self, model, precision="fp32", slots=1, quantized=None, group=0):
        check_precision(precision)
        arch = model.arch
        self.arch, self.precision, self.pos, self.slots = arch, precision, 0, slots
        self.bf16 = precision == "bf16"
        self.code, self.group = PRECISION_CODES[precision], group
        if precision in BITS and not quantized:
            raise SqlgptError(f"{precision} decoding needs the model's {precision} weights "
                              f"(sqlgpt quantize)")
        if precision in BITS:
            check_group(arch, group)  # the kernel divides by it and reads groups of it
        arrays = self._snapshot(model, quantized if precision in BITS else None)
        self.config = model_config(arch)
        self.tensors = TensorStruct(arch.num_layers,
                                    *tensor_fields(arch, arrays, model.weights_fixed))
        self.grow(slots)
        self.logits = aligned_zeros((1, arch.n_vocab))

    def _snapshot(self, model, quantized):
        """{name: array} for the decode struct: matrices packed into panels
        (one aligned block) or their quantized rows, everything else copied
        as float32."""
        arrays, matrices = {}, {}
        weights = merged(model)  # a fine-tune's adapters folded in once, here
        for spec in tensor_table(model.arch):
            if quantized and spec.name in quantized:
                arrays[spec.name] = kernel_block(*quantized[spec.name])
                continue
            data = weights[spec.tied_to or spec.name]
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


class Window:
    """What one sequence's KV cache (a slot of a Decoder) holds: the tokens
    context[base:base + pos]. Positions run from 0 at base; when the context
    outgrows the model's seq_len, the window restarts from the context's last
    half (every position scheme: learned positions stop at seq_len)."""

    def __init__(self, decoder, prompt, slot=0):
        self.decoder, self.slot, self.pos = decoder, slot, 0
        self.T = decoder.arch.seq_len
        self.base = max(0, len(prompt) - self.T)  # a prompt longer than the context keeps its end

    def room(self, context):
        """Tokens that fit after the context, sliding first if it does not fit."""
        if len(context) - self.base > self.T:
            self.base, self.pos = len(context) - max(1, self.T // 2), 0
        return self.T - (len(context) - self.base)

    def rows(self, context, extra=()):
        """(tokens, positions) of the rows to feed: the context's tokens the
        cache lacks, then extra (a draft's proposals)."""
        self.room(context)
        tokens = [*context[self.base + self.pos:], *extra]
        return tokens, range(self.pos, self.pos + len(tokens))

    def feed(self, context, extra=(), n_out=1):
        """Run the rows; the logits of the last n_out of them."""
        tokens, positions = self.rows(context, extra)
        logits = self.decoder.run([self.slot] * len(tokens), tokens, positions,
                                  range(len(tokens) - n_out, len(tokens)))
        self.pos += len(tokens)
        return logits

    def keep(self, length):
        """Forget what the cache holds past context[:length] (rejected drafts)."""
        self.pos = max(0, min(self.pos, length - self.base))


def check_lengths(max_tokens):
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise SqlgptError("max_tokens must be an integer >= 0")


def generate_batch(decoder, prompts, max_tokens, sampler, seed=None, banned=(), eos_id=None,
                   finished=()):
    """Yield (index, token) as the sequences after prompts (lists of ids)
    are sampled, all of them in each batched step (up to decoder.slots
    sequences); a sequence ends at eos_id (not yielded), after max_tokens, or
    once the caller adds its index to the set `finished`. Sequence i draws
    from sequence_rng(seed, i)."""
    check_lengths(max_tokens)
    check_seed(seed)
    if len(prompts) > decoder.slots:
        raise SqlgptError(f"{len(prompts)} sequences but the decoder has {decoder.slots} slots")
    contexts = [[int(t) for t in p] for p in prompts]
    if any(not c for c in contexts):
        raise SqlgptError("the context is empty: generation needs at least one token")
    windows = [Window(decoder, c, i) for i, c in enumerate(contexts)]
    rngs = [sequence_rng(seed, i) for i in range(len(prompts))]
    if len(prompts) == 1:
        yield from _one_sequence(decoder, contexts[0], windows[0], rngs[0], max_tokens, sampler,
                                 banned, eos_id, finished)
        return
    left = [max_tokens] * len(prompts)
    while True:
        active = [i for i in range(len(prompts)) if left[i] > 0 and i not in finished]
        if not active:
            return
        slots, tokens, positions, out_rows = [], [], [], []
        for i in active:
            feed, at = windows[i].rows(contexts[i])
            slots += [i] * len(feed)
            tokens += feed
            positions += at
            out_rows.append(len(tokens) - 1)
            windows[i].pos += len(feed)
        logits = decoder.run(slots, tokens, positions, out_rows)
        penalized = sampler.repetition_penalty != 1.0  # only then is the context read
        picks = sampler.sample_rows(
            logits, [rngs[i] for i in active],
            [contexts[i][windows[i].base:] if penalized else () for i in active], banned)
        for i, token in zip(active, picks):
            context = contexts[i]
            left[i] -= 1
            if token == eos_id:
                left[i] = 0
                continue
            context.append(token)
            yield i, token


def _one_sequence(decoder, context, window, rng, max_tokens, sampler, banned, eos_id, finished):
    """generate_batch for one sequence in slot 0: the prompt (or what the
    cache lacks after the window slides) in one step, then up to CHUNK
    tokens a C call, the decode steps and the draws together: the same
    ids, with nothing per token in Python but handing each on."""
    run = sampler.bind(decoder, rng, banned, eos_id)
    penalized = sampler.repetition_penalty != 1.0
    left = max_tokens
    while left > 0 and 0 not in finished:
        feed, positions = window.rows(context)
        recent = context[window.base:] if penalized else ()
        if len(feed) == 1:
            drawn = run(feed[0], positions[0], min(left, CHUNK), recent)
            window.pos += len(drawn)  # the token fed and every id drawn but the last
        else:
            logits = decoder.run([0] * len(feed), feed, positions, [len(feed) - 1])
            drawn = [sampler.sample(logits[0], rng, recent, banned)]
            window.pos += len(feed)
        for token in drawn:
            left -= 1
            if token == eos_id:
                return
            context.append(token)
            yield 0, token


def generate_ids(decoder, prompt_ids, max_tokens, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, banned=(), min_p=0.0, repetition_penalty=1.0):
    """Yield max_tokens sampled ids after prompt_ids from a Decoder's slot 0,
    in eval mode. The context is at most seq_len tokens; when it fills, it
    restarts from the last half."""
    sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty)
    for _, token in generate_batch(decoder, [prompt_ids], max_tokens, sampler, seed, banned):
        yield token


@dataclass
class GenerationStats:
    """What a run generated: tokens, and with a draft model the tokens it
    proposed, those the target accepted, and the target's decode steps."""
    tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance(self):
        return self.accepted / self.proposed if self.proposed else 0.0


def speculative_ids(target, draft, prompt_ids, max_tokens, sampler, seed=None, banned=(),
                    eos_id=None, draft_tokens=DRAFT_TOKENS, stats=None):
    """Yield the tokens after prompt_ids, distributed exactly as the target
    model samples them (greedy: its very tokens), from speculative decoding:
    the draft proposes up to draft_tokens tokens, the target scores them all
    in one batched step and keeps each with probability min(1, p/q),
    drawing a rejected one again from the normalized max(p - q, 0), and a
    bonus token when all are kept. target and draft: Decoders (slot 0) with
    the same tokenizer; stats: a GenerationStats to fill."""
    check_lengths(max_tokens)
    check_seed(seed)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or \
            not 1 <= draft_tokens <= 32:
        raise SqlgptError(f"draft_tokens must be an integer from 1 to 32, got {draft_tokens!r}")
    rng = Rng(seed)
    stats = stats if stats is not None else GenerationStats()
    context = [int(t) for t in prompt_ids]
    if not context:
        raise SqlgptError("the context is empty: generation needs at least one token")
    big, small = Window(target, context), Window(draft, context)
    left = max_tokens
    while left > 0:
        k = max(0, min(draft_tokens, left - 1, big.room(context), small.room(context) + 1))
        proposals, q_rows = [], []
        for _ in range(k):  # the draft proposes, one token at a time
            q = sampler.probs(small.feed(context, proposals[-1:] if proposals else ())[0],
                              context[small.base:] + proposals, banned)
            proposals.append(int(np.argmax(q)) if sampler.greedy
                             else int(rng.choice(q.size, p=q)))
            q_rows.append(q)
        logits = big.feed(context, proposals, n_out=k + 1)  # scored all at once
        stats.steps += 1
        stats.proposed += k
        new = []
        for i in range(k + 1):
            p = sampler.probs(logits[i], context[big.base:] + new, banned)
            if i == k:  # every proposal kept: a bonus token from the target
                new.append(int(rng.choice(p.size, p=p)))
                break
            token, q = proposals[i], q_rows[i]
            if sampler.greedy:
                keep = p[token] == 1.0
            else:
                keep = rng.random() < min(1.0, p[token] / q[token])
            if keep:
                new.append(token)
                stats.accepted += 1
                continue
            residual = np.maximum(p - q, 0.0)
            residual = residual / residual.sum() if residual.sum() > 0 else p
            new.append(int(rng.choice(residual.size, p=residual)))
            break
        # the caches hold the context and the kept proposals; the rest is stale
        for w in (big, small):
            w.keep(len(context) + min(len(new) - 1, k))
        for token in new:
            if left == 0:
                return
            left -= 1
            if token == eos_id:
                return
            context.append(token)
            stats.tokens += 1
            yield token
