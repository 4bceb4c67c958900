"""Generating text from a trained model.

Generation runs tokens through the whole model in one kernel call
(decode_batch) with a KV cache per sequence: a prompt's tokens go in one
call, and the sequences of a batch share every step, so each weight is read
once for all of them. Speculative decoding lets a small draft model propose
tokens that the target checks in one such step.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import SqlgptError
from .sampling import CHUNK, Rng, Sampler, check_seed, sequence_rng

MAX_BATCH = 256    # sequences generated together (each holds a KV cache)
DRAFT_TOKENS = 4   # tokens a draft model proposes per verification step


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
