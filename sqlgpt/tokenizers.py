"""Tokenizers: build a vocabulary from a corpus, encode text, decode ids.

The word tokenizer is the original's, with its bug fixed: building and encoding
sanitize text the SAME way (delete every character that is neither
alphanumeric nor whitespace, lower-case, split on whitespace), and there is
one unknown id.
"""
import re
from collections import Counter

import numpy as np

from .errors import SqlgptError

PAD, UNK = "<pad>", "<unk>"
_NOT_WORD = re.compile(r"[^\w\s]|_")  # \w is Unicode alphanumerics plus "_"


def words_of(text):
    """The original's sanitizing: strip punctuation, lower-case, split."""
    return _NOT_WORD.sub("", text).lower().split()


class WordTokenizer:
    """ids: <pad> = 0, words 1..N (most frequent first), <unk> = N + 1."""

    kind = "word"

    def __init__(self, words):
        self.words = list(words)
        self.unk_id = len(self.words) + 1
        self.id_of = {w: i + 1 for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, text, vocab_size):
        """The vocab_size most frequent words; ties broken alphabetically so the
        same corpus always gives the same ids."""
        counts = Counter(words_of(text))
        ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
        return cls(w for w, _ in ranked[:vocab_size])

    @property
    def vocab_size(self):
        """Number of words (classes are vocab_size + 2)."""
        return len(self.words)

    @property
    def n_ids(self):
        """Token ids, special ones included: the rows of the model's wte."""
        return len(self.words) + 2

    def vocab(self):
        """(token, id) pairs, special tokens included, for storage."""
        return [(PAD, 0)] + [(w, i + 1) for i, w in enumerate(self.words)] + [(UNK, self.unk_id)]

    @classmethod
    def from_vocab(cls, pairs):
        """Inverse of vocab(); validates that ids are exactly 0..N+1."""
        by_id = {i: w for w, i in pairs}
        n = len(by_id) - 2
        if n < 1 or len(by_id) != len(pairs) or set(by_id) != set(range(n + 2)) \
                or by_id[0] != PAD or by_id[n + 1] != UNK:
            raise SqlgptError("the vocab table is damaged (ids must be <pad>=0, words 1..N, <unk>=N+1)")
        return cls(by_id[i] for i in range(1, n + 1))

    def encode(self, text):
        unk = self.unk_id
        return np.array([self.id_of.get(w, unk) for w in words_of(text)], dtype=np.int32)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if any(not 0 <= i <= self.unk_id for i in ids):
            raise SqlgptError(f"token id out of range [0, {self.unk_id}]")
        special = {0: "", self.unk_id: UNK}
        out = (special[i] if i in special else self.words[i - 1] for i in ids)
        return " ".join(w for w in out if w)


TOKENIZERS = {"word": WordTokenizer}
