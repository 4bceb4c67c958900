"""Tokenizers: build a vocabulary from a corpus, encode text, decode ids, and
store the whole tokenizer in the database. One module per kind, one protocol:

    kind                      "word", "char", "byte", "bpe", or "hf" (imported with a
                              model: a byte-level BPE tokenizer.json as it is)
    n_ids                     token ids, specials included (the rows of wte)
    pad_id, unk_id, bos_id, eos_id   ints, or None where the kind has none
    build(texts, vocab_size)  classmethod; texts: an iterable of str chunks,
                              read once (a lone str is one chunk)
    encode(text)              -> int32 array
    encode_chunks(chunks)     -> one int32 array per chunk; concatenated they
                              equal encode("".join(chunks)) when every cut is
                              right after a "\\n" followed by non-whitespace
    decode(ids)               -> str, pieces joined as they came (word: with
                              spaces); <pad> <bos> <eos> are "", <unk> is
                              "<unk>" (word) or U+FFFD; an id out of range is
                              a SqlgptError
    pieces(ids)               -> a readable str per id (see base.readable)
    vocab_rows()              -> [(id, readable token, bytes or None)], ids 0..n_ids-1
    state()                   -> {key: text}: the rest of the tokenizer
    from_storage(rows, state) classmethod: the inverse of the two above,
                              every part checked (damage: one-line SqlgptError)

Special ids: word: <pad> = 0, words 1..N, <unk> = N + 1 (no <bos>, <eos>);
char, byte, bpe: <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3. Documents are
separated by the caller with eos_id; encode never produces a special token
except <unk> (word, char) for text outside the vocabulary.
"""
from ...errors import SqlgptError
from .base import BOS, EOS, PAD, SPECIALS, UNK, readable
from .bpe import BPETokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .hf import HFTokenizer
from .word import WordTokenizer, words_of

TOKENIZERS = {"word": WordTokenizer, "char": CharTokenizer, "byte": ByteTokenizer,
              "bpe": BPETokenizer}  # what train builds
STORED = {**TOKENIZERS, "hf": HFTokenizer}  # what a database may hold

__all__ = ["BOS", "EOS", "PAD", "SPECIALS", "UNK", "TOKENIZERS", "BPETokenizer", "ByteTokenizer",
           "CharTokenizer", "HFTokenizer", "WordTokenizer", "from_storage", "readable", "words_of"]


def from_storage(kind, rows, state):
    """The tokenizer of this kind from its vocab rows (id, token, bytes) and
    state {key: text}, validated."""
    if kind not in STORED:
        raise SqlgptError(f"unknown tokenizer kind {kind!r} (known: {', '.join(STORED)})")
    return STORED[kind].from_storage(rows, state)
