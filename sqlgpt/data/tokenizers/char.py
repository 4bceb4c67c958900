"""The char tokenizer: one id per character (code point) of the corpus.

ids: <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3, then the alphabet in
code-point order from id 4. A character outside the alphabet encodes to
<unk>, which decodes to U+FFFD; within the alphabet decode(encode(x)) == x.
"""
import numpy as np

from ...errors import SqlgptError
from .base import (N_SPECIALS, Tokenizer, check_specials, check_state, chunks_of, codepoints,
                   damaged, read_rows, special_names)

_N_CODEPOINTS = 0x110000


class CharTokenizer(Tokenizer):
    kind = "char"
    pad_id, unk_id, bos_id, eos_id = range(N_SPECIALS)

    def __init__(self, alphabet):
        """alphabet: distinct characters in code-point order (id 4 onwards)."""
        self.alphabet = "".join(alphabet)
        cps = codepoints(self.alphabet)
        # a lookup table from code point to id; one entry past the largest
        # code point catches everything above it as <unk>
        self._lut = np.full(int(cps.max(initial=0)) + 2, self.unk_id, dtype=np.int32)
        self._lut[cps] = np.arange(N_SPECIALS, N_SPECIALS + len(cps), dtype=np.int32)
        self._set_table([None] * N_SPECIALS + [c.encode() for c in self.alphabet])

    @classmethod
    def build(cls, texts, vocab_size):
        """Every distinct character of the chunks if vocab_size is 0 or at
        least their number, else the vocab_size most frequent (ties by code
        point); vocab_size counts characters, not the 4 special ids."""
        if vocab_size < 0:
            raise SqlgptError(f"the char tokenizer's vocab size is a number of characters "
                              f"(0: all of them), not {vocab_size}")
        counts = np.zeros(0, dtype=np.int64)
        for chunk in chunks_of(texts):
            c = np.bincount(codepoints(chunk))
            if len(c) > len(counts):
                counts = np.concatenate([counts, np.zeros(len(c) - len(counts), np.int64)])
            counts[:len(c)] += c
        cps = np.flatnonzero(counts)
        if 0 < vocab_size < len(cps):
            # most frequent first, ties by smaller code point; then code-point order
            cps = np.sort(cps[np.lexsort((cps, -counts[cps]))[:vocab_size]])
        return cls("".join(map(chr, cps.tolist())))

    @classmethod
    def from_storage(cls, rows, state):
        """Inverse of (vocab_rows(), state()): the specials, then single
        characters in strictly increasing code-point order."""
        check_state(state, ())
        entries = read_rows(rows)
        raws = check_specials(entries, special_names(*range(N_SPECIALS)))
        chars = []
        for i, raw in enumerate(raws[N_SPECIALS:], N_SPECIALS):
            try:
                c = raw.decode("utf-8")
            except UnicodeDecodeError:
                c = ""
            if len(c) != 1:
                raise damaged(f"char token {i} ({entries[i][0]!r}) is not one character")
            if chars and c <= chars[-1]:
                raise damaged(f"char token {i} ({entries[i][0]!r}) is out of code-point order")
            chars.append(c)
        return cls(chars)

    def encode(self, text):
        cps = codepoints(text)
        return self._lut[np.minimum(cps, len(self._lut) - 1)]
