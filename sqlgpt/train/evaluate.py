"""Scoring a model on text it is not trained on: mean cross-entropy per
token, perplexity and next-token accuracy, in evaluation mode.

Windows of seq_len tokens slide over the ids `stride` apart; each window
scores only the targets no earlier window scored, so every token counts
once and, after the first window, has at least seq_len - stride tokens of
context (stride 1: every token its full context, one window per token).
"""
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import SqlgptError
from ..model.model import IGNORE


@dataclass
class Evaluation:
    loss: float        # mean cross-entropy per scored token (nats)
    perplexity: float
    accuracy: float    # how often the most likely next token is the right one
    tokens: int        # tokens scored

    def to_dict(self):
        return asdict(self)


def windows(n_targets, T, stride):
    """(start, first) per window: tokens[start:start + T] predict
    tokens[start + 1:start + T + 1], of which the ones from index first on
    (relative to start) are scored. Together they score every target once."""
    if n_targets < 1:
        return []
    starts = list(range(0, max(1, n_targets - T + 1), stride))
    if starts[-1] + T < n_targets:  # the tail: one last window ending at the end
        starts.append(n_targets - T)
    spans, scored = [], 0
    for start in starts:
        spans.append((start, scored - start))
        scored = start + min(T, n_targets - start)
    return spans


def scored_by_decoder(decoder, x, y):
    """(mean loss over y's scored targets, each position's most likely id
    (B, T)) of windows x (B, T) as the decode step computes them, one window
    at a time in slot 0: the loss of bf16 or quantized weights as generation
    sees them, in memory for one window's logits."""
    B, T = x.shape
    losses, guesses = np.zeros((B, T)), np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        logits = decoder.run([0] * T, x[b].tolist(), list(range(T)), list(range(T)))
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0].astype(np.float64) + np.log(
            np.exp(logits - top).sum(axis=1, dtype=np.float64))
        targets = np.where(y[b] == IGNORE, 0, y[b])
        losses[b] = log_z - logits[np.arange(T), targets]
        guesses[b] = logits.argmax(axis=1)
    scored = y != IGNORE
    return float(losses[scored].mean()), guesses


def evaluate(model, tokens, stride=None, batch_size=8, limit=None, decoder=None,
             on_progress=None):
    """Evaluation of model (a GPT) on a 1-D array of token ids; stride
    defaults to half the context (of the text, when it is shorter); limit,
    if given, keeps that many windows spread evenly over the ids. decoder:
    score through this Decoder's weights (bf16, int8, int4) instead of the
    float32 forward. on_progress(windows done, windows): called after each
    batch."""
    T = model.arch.seq_len
    tokens = np.asarray(tokens)
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise SqlgptError("the text has fewer than 2 tokens: nothing to score")
    T = min(T, n_targets)
    stride = stride or max(1, T // 2)
    if not 1 <= stride <= T:
        raise SqlgptError(f"stride must be from 1 to the context length {T}, got {stride}")
    spans = windows(n_targets, T, stride)
    if limit and limit < len(spans):  # spread out, each scoring its whole window
        spans = [(start, 0) for start in np.linspace(0, n_targets - T, limit).astype(int)]
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        index = np.array([start for start, _ in batch])[:, None] + np.arange(T)
        x, y = tokens[index].astype(np.int32), tokens[index + 1].astype(np.int32)
        for row, (_, first) in enumerate(batch):
            y[row, :max(0, first)] = IGNORE  # scored by an earlier window
        scored = y != IGNORE
        if decoder is None:
            mean = model.forward(x, y)
            guesses = model.acts.logits.reshape(len(batch), T, -1).argmax(axis=-1)
        else:
            mean, guesses = scored_by_decoder(decoder, x, y)
        n = int(scored.sum())
        total += mean * n
        count += n
        correct += int((guesses == y)[scored].sum())
        if on_progress is not None:
            on_progress(i + len(batch), len(spans))
    loss = total / count
    return Evaluation(loss, math.exp(min(loss, 700.0)), correct / count, count)


def evaluate_chat(model, chat, batch_size=8, limit=None):
    """Evaluation on held-out conversations (sqlgpt.chat.data.ChatTokens):
    loss and accuracy on the assistant's tokens alone, each conversation
    from its start; limit keeps that many, spread evenly."""
    T = model.arch.seq_len
    which = np.arange(len(chat))
    if limit and limit < len(which):
        which = np.linspace(0, len(chat) - 1, limit).astype(int)
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(which), batch_size):
        x, y = chat.rows(which[i:i + batch_size], T)
        scored = y != IGNORE
        n = int(scored.sum())
        if not n:
            continue
        mean = model.forward(x, y)
        guesses = model.acts.logits[:x.size].reshape(len(x), T, -1).argmax(axis=-1)
        total += mean * n
        count += n
        correct += int((guesses == y)[scored].sum())
    if not count:
        raise SqlgptError("the held-out conversations have no assistant tokens to score")
    loss = total / count
    return Evaluation(loss, math.exp(min(loss, 700.0)), correct / count, count)
