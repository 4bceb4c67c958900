"""The word tokenizer: the original's, with its bug fixed: building and encoding
sanitize text the SAME way (delete every character that is neither
alphanumeric nor whitespace, lower-case, split on whitespace), and there is
one unknown id.

Lossy by design: capitals, punctuation, "_" and line breaks are gone, and
decode joins words with single spaces. ids: <pad> = 0, words 1..N (most
frequent first, ties alphabetical), <unk> = N + 1; no <bos> or <eos>.
"""
import re
from collections import Counter

import numpy as np

from .base import (PAD, UNK, Tokenizer, check_specials, check_state, chunks_of, damaged, read_rows,
                   utf8)

_NOT_WORD = re.compile(r"[^\w\s]|_")  # \w is Unicode alphanumerics plus "_"


def words_of(text):
    """The original's sanitizing: strip punctuation, lower-case, split."""
    return _NOT_WORD.sub("", text).lower().split()


class WordTokenizer(Tokenizer):
    """ids: <pad> = 0, words 1..N (most frequent first), <unk> = N + 1."""

    kind = "word"
    pad_id = 0

    def __init__(self, words):
        self.words = list(words)
        self.unk_id = len(self.words) + 1
        self.id_of = {w: i + 1 for i, w in enumerate(self.words)}
        self._set_table([None, *map(utf8, self.words), None])

    @classmethod
    def build(cls, texts, vocab_size):
        """The vocab_size most frequent words of the chunks (cut at whitespace);
        ties broken alphabetically so the same corpus always gives the same ids."""
        counts = Counter()
        for chunk in chunks_of(texts):
            counts.update(words_of(chunk))
        ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
        return cls(w for w, _ in ranked[:vocab_size])

    @property
    def vocab_size(self):
        """Number of words (n_ids is vocab_size + 2)."""
        return len(self.words)

    @classmethod
    def from_storage(cls, rows, state):
        """Inverse of (vocab_rows(), state()); ids must be <pad>=0, words
        1..N, <unk>=N+1, each word as words_of() makes it. A word's bytes may
        be None (version-1 files stored only the text)."""
        check_state(state, ())
        entries = read_rows(rows)
        n = len(entries) - 2
        if n < 1:
            raise damaged("the word tokenizer needs <pad>, at least one word and <unk>")
        names = {0: PAD, n + 1: UNK}
        entries = [(t, t.encode() if raw is None and i not in names else raw)
                   for i, (t, raw) in enumerate(entries)]
        raws = check_specials(entries, names)
        words = [raw.decode("utf-8", "replace") for raw in raws[1:-1]]
        for w in words:
            if words_of(w) != [w]:
                raise damaged(f"{w!r} is not a word as the word tokenizer writes them")
        return cls(words)

    def encode(self, text):
        unk = self.unk_id
        return np.array([self.id_of.get(w, unk) for w in words_of(text)], dtype=np.int32)

    def stream(self, ids=()):
        return WordStream(self, self.decode(ids) != "")

    def decode(self, ids):
        """Words joined with single spaces; <pad> is dropped, <unk> is "<unk>"."""
        ids = self._ids(ids)
        special = {0: "", self.unk_id: UNK}
        out = (special[i] if i in special else self.words[i - 1] for i in ids.tolist())
        return " ".join(w for w in out if w)


class WordStream:
    """Word ids to text one at a time (see Tokenizer.stream): each word
    after the first with one space before it; <pad> adds nothing."""

    def __init__(self, tokenizer, started):
        self._tokenizer, self._started = tokenizer, started

    def push(self, token):
        tok = self._tokenizer
        word = "" if token == 0 else UNK if token == tok.unk_id else tok.words[token - 1]
        if not word:
            return ""
        piece = f" {word}" if self._started else word
        self._started = True
        return piece

    def finish(self):
        return ""
