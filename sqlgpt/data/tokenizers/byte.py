"""The byte tokenizer: the UTF-8 bytes of the text, lossless on any str.

ids: <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3, byte b = 4 + b (260 ids).
There is nothing to learn: build() reads nothing and ignores vocab_size.
decode of ids that cut a character writes U+FFFD for the cut bytes.
"""
import numpy as np

from .base import (N_SPECIALS, Tokenizer, check_specials, check_state, damaged, read_rows,
                   special_names, utf8)


class ByteTokenizer(Tokenizer):
    kind = "byte"
    pad_id, unk_id, bos_id, eos_id = range(N_SPECIALS)

    def __init__(self):
        self._set_table([None] * N_SPECIALS + [bytes([b]) for b in range(256)])

    @classmethod
    def build(cls, texts, vocab_size):
        """The one byte tokenizer: texts is not read, vocab_size is ignored."""
        return cls()

    @classmethod
    def from_storage(cls, rows, state):
        """Inverse of (vocab_rows(), state()): the specials, then the bytes 0..255."""
        check_state(state, ())
        tok, entries = cls(), read_rows(rows)
        if entries != [(t, raw) for _, t, raw in tok.vocab_rows()]:
            check_specials(entries, special_names(*range(N_SPECIALS)))  # its error if it has one
            raise damaged(f"the byte tokenizer's ids must be the {N_SPECIALS} specials, "
                          f"then byte b at {N_SPECIALS} + b")
        return tok

    def encode(self, text):
        return np.frombuffer(utf8(text), dtype=np.uint8).astype(np.int32) + N_SPECIALS
