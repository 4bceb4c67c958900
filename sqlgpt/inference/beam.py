"""Beam search: the num_beams most likely continuations kept at each step,
all of them decoded together in one batched step (a slot of the decoder
each), the most likely finished ones returned.

A hypothesis's score is its tokens' summed log-probability divided by its
length to the power length_penalty (its generated tokens, the end token
included): 0 ranks by probability alone, 1 by the mean per token (longer
answers fare better as it grows). A hypothesis finishes at end_id or after
max_tokens. The search stops once num_beams have finished and no live beam,
even gaining nothing more, could outscore the worst of them, or at
max_tokens. With one beam it is greedy decoding.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import SqlgptError

MAX_BEAMS = 64


@dataclass
class Hypothesis:
    ids: list          # the generated ids (the end token not included)
    logprob: float     # their summed log-probability (the end token's included)
    score: float       # logprob / length ** length_penalty
    finished: bool     # it reached the end token (else max_tokens ended it)


def _score(logprob, length, length_penalty):
    return logprob / max(1, length) ** length_penalty


def check_beams(num_beams, length_penalty):
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or \
            not 1 <= num_beams <= MAX_BEAMS:
        raise SqlgptError(f"num_beams must be an integer from 1 to {MAX_BEAMS}, got "
                          f"{num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or \
            not np.isfinite(length_penalty) or abs(length_penalty) > 10:
        raise SqlgptError(f"length_penalty must be a number from -10 to 10, got "
                          f"{length_penalty!r}")


def log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    top = row.max()
    return row - top - np.log(np.exp(row - top).sum())


def beam_search(decoder, prompt_ids, num_beams, max_tokens, length_penalty=1.0, end_id=None,
                banned=()):
    """The num_beams best Hypotheses after prompt_ids (best first), from a
    Decoder with at least num_beams slots."""
    check_beams(num_beams, length_penalty)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise SqlgptError("the context is empty: generation needs at least one token")
    T = decoder.arch.seq_len
    if len(prompt) + max_tokens > T:
        raise SqlgptError(f"beam search keeps the whole sequence in the context: the prompt "
                          f"({len(prompt)} tokens) and --max-tokens ({max_tokens}) exceed "
                          f"{T}")
    banned = np.array(sorted(set(banned)), dtype=np.int64)
    logits = decoder.run([0] * len(prompt), prompt, range(len(prompt)), [len(prompt) - 1])
    beams = [([], 0.0)]  # (ids, summed log-probability) per live slot
    rows = log_softmax(logits[0])[None]
    done = []
    for step in range(max_tokens):
        rows[:, banned] = -np.inf
        totals = (np.array([lp for _, lp in beams])[:, None] + rows).ravel()
        order = np.argsort(-totals, kind="stable")[:2 * num_beams]
        V = rows.shape[1]
        survivors, parents = [], []
        for flat in order:
            parent, token = divmod(int(flat), V)
            total = float(totals[flat])
            if not np.isfinite(total):
                break
            ids = beams[parent][0] + [token]
            if token == end_id:
                done.append(Hypothesis(ids[:-1], total, _score(total, len(ids),
                                                                length_penalty), True))
            else:
                survivors.append((ids, total))
                parents.append(parent)
            if len(survivors) == num_beams:
                break
        done.sort(key=lambda h: -h.score)
        del done[num_beams:]
        if not survivors or _settled(done, survivors, num_beams, max_tokens, length_penalty):
            break
        if step == max_tokens - 1:
            done += [Hypothesis(ids, lp, _score(lp, len(ids), length_penalty), False)
                     for ids, lp in survivors]
            break
        decoder.reorder(parents)
        beams = survivors
        pos = len(prompt) + step
        logits = decoder.run(list(range(len(beams))), [ids[-1] for ids, _ in beams],
                             [pos] * len(beams), list(range(len(beams))))
        rows = np.stack([log_softmax(row) for row in logits])
    if not done:
        raise SqlgptError("every token is banned or impossible: beam search found nothing")
    return sorted(done, key=lambda h: -h.score)[:num_beams]


def _settled(done, survivors, num_beams, max_tokens, length_penalty):
    """Whether no live beam can beat the worst of num_beams finished ones:
    log-probabilities only fall, so a beam's best is its score now at the
    length that divides it most kindly."""
    if len(done) < num_beams:
        return False
    worst = done[-1].score
    for ids, lp in survivors:
        lengths = (len(ids) + 1, max_tokens)
        if max(_score(lp, n, length_penalty) for n in lengths) > worst:
            return False
    return True
