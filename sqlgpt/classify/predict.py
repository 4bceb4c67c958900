"""A classifier's label probabilities for texts (or encoded rows)."""
import numpy as np

from ..errors import SqlgptError
from .data import Examples

BATCH = 16  # rows per forward: similar lengths together (sorted), so little padding


def encode_texts(tokenizer, texts, T):
    """Examples of texts (label ids 0: unused), each cut to T tokens; a
    text that is not one, or is empty, is a one-line error."""
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise SqlgptError("a classifier needs non-empty text to classify")
    labelled = ((text, "") for text in texts)
    return Examples.encode(labelled, tokenizer, [""], T)[0]


def probabilities(gpt, examples):
    """(n, num_labels) softmax probabilities of the examples' rows, and the
    mean loss against their labels when labelled (else None)."""
    order = np.argsort(examples.lens, kind="stable")
    probs = np.zeros((len(examples), gpt.arch.num_labels), dtype=np.float64)
    total = 0.0
    for start in range(0, len(order), BATCH):
        which = order[start:start + BATCH]
        rows = examples.rows(which).trimmed()
        loss = gpt.classify_forward(rows.ids, rows.lens, rows.labels)
        total += loss * len(which)
        logits = gpt.acts.logits.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        probs[which] = e / e.sum(axis=1, keepdims=True)
    return probs, total / max(len(examples), 1)
