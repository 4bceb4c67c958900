"""Byte-level BPE, trained and run by the HF `tokenizers` library (Rust).

ids: <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3, then the 256 single bytes
(in the library's order, by the character it shows each byte as), then one
token per merge in the order training made them. build(texts, vocab_size):
vocab_size counts every id (the 4 specials and the 256 bytes too), so it is at
least 260; a small corpus may give fewer.

The rules, stated so that a C encoder can reproduce them exactly:

1. No normalization: the text's UTF-8 bytes as they are.
2. Pre-tokenization cuts the bytes into pieces. Whitespace means only the six
   ASCII bytes space, \\t, \\n, \\v (0x0b), \\f (0x0c) and \\r; every other
   byte (NUL and every byte >= 0x80 included, so U+00A0 or U+3000 belong to
   words) is non-whitespace. Scanning from the start, the piece that starts
   at byte i is:
   a. b[i] non-whitespace: the run of non-whitespace bytes from i;
   b. b[i] a space and b[i+1] non-whitespace: that space and the run of
      non-whitespace bytes after it;
   c. b[i] a space otherwise: the run of spaces from i, except that if the
      run is followed by non-whitespace its last space is left to start the
      next piece (by b), so "a   b" is "a", "  ", " b";
   d. b[i] one of \\t \\n \\v \\f \\r: that one byte.
   This is the library's Split(PATTERN, behavior="isolated") (leftmost
   alternative first, greedy, one byte of lookahead) followed by ByteLevel
   (add_prefix_space=False, use_regex=False), which only renames bytes.
   A "\\n" is always a piece of its own, so text can be cut after any "\\n"
   without changing the pieces.
3. BPE within each piece: start from one token per byte; while some adjacent
   pair of tokens has a merge, merge the pair of lowest rank (its leftmost
   occurrence first). A merge (left, right) makes the token whose bytes are
   left's followed by right's.

Special tokens are never produced by encode: the text "<eos>" is encoded as
ordinary bytes and merges. (The library's trainer gives a merge that spells a
special's name, learned from text that contains it, that special's id; such
merges, and any built on their result, are dropped after training.)

Stored: the vocab rows hold each token's bytes; state() holds "pattern"
(checked against PATTERN: the rule above lives in code, not data), "merges"
(JSON [[left_id, right_id], ...] in rank order, for SQL and C) and
"tokenizer_json" (the library's Tokenizer.to_str(), for export; it must agree
with the vocab and the merges).
"""
import json

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Library

from .. import safe_json
from ...contract import PRETOKENIZER_PATTERNS
from ...errors import SqlgptError
from .base import (N_SPECIALS, SPECIALS, Tokenizer, check_specials, check_state, chunks_of, damaged,
                   load_json, read_rows, readable, special_names, utf8)

PATTERN = PRETOKENIZER_PATTERNS["sqlgpt"]
MIN_VOCAB = N_SPECIALS + 256
_PIECE_CHARS = 1 << 16  # encode cuts text after a "\n" about every 64K characters
_BATCH_CHARS = 1 << 20  # and gives the library ~1M characters per call, for its threads
_TRAIN_CHARS = 1 << 14  # training is fed ~16K-character pieces: the library reads 256 at a time


def _byte_chars():
    """GPT-2's byte -> character map, which the library's ByteLevel uses:
    printable Latin-1 bytes are themselves, the other 68 are U+0100 onwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(others)) for b in range(256)]


BYTE_CHARS = _byte_chars()
_BYTE_OF = {c: b for b, c in enumerate(BYTE_CHARS)}


def _library(vocab=None, merges=None):
    """A tokenizers.Tokenizer with sqlgpt's pipeline (an untrained one without vocab)."""
    lib = Library(models.BPE() if vocab is None else models.BPE(vocab=vocab, merges=merges))
    lib.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    lib.decoder = decoders.ByteLevel()
    return lib


def _pair(merge):
    """A merge as the library's JSON writes it ([l, r], or "l r" in old versions)."""
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _from_trainer(vocab, merges):
    """The trained vocab ({library string: id}) and merges -> (raws, merges as
    id pairs), without merges that spell a special or build on one."""
    live, kept = set(BYTE_CHARS), []
    for left, right in map(_pair, merges):
        if left in live and right in live and left + right not in SPECIALS:
            kept.append((left, right))
            live.add(left + right)
    tokens = [*SPECIALS, *(t for t in sorted(vocab, key=vocab.get) if t in live)]
    id_of = {t: i for i, t in enumerate(tokens)}
    raws = [None] * N_SPECIALS + [bytes(_BYTE_OF[c] for c in t) for t in tokens[N_SPECIALS:]]
    return raws, [(id_of[left], id_of[right]) for left, right in kept]


def _split(text, size=_PIECE_CHARS):
    """text cut right after a "\\n" about every size characters."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size) + 1
        if cut == 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


class BPETokenizer(Tokenizer):
    kind = "bpe"
    pad_id, unk_id, bos_id, eos_id = range(N_SPECIALS)

    def __init__(self, raws, merges):
        """raws: each id's bytes (None for the 4 specials); merges: (left_id,
        right_id) in rank order, each making a token of raws."""
        self.merges = [tuple(m) for m in merges]
        self._set_table(raws)
        keys = [SPECIALS[i] if r is None else "".join(BYTE_CHARS[b] for b in r)
                for i, r in enumerate(self._raws)]
        self._lib = _library({k: i for i, k in enumerate(keys)},
                             [(keys[left], keys[right]) for left, right in self.merges])
        self._lib.add_special_tokens(list(SPECIALS))
        self._lib.encode_special_tokens = True  # the text "<eos>" is text, never the special

    @classmethod
    def build(cls, texts, vocab_size):
        """Train on the chunks (streamed once) to at most vocab_size ids."""
        if vocab_size < MIN_VOCAB:
            raise SqlgptError(f"the bpe tokenizer needs a vocab size of at least {MIN_VOCAB} "
                              f"({N_SPECIALS} special tokens and 256 bytes), not {vocab_size}")
        lib = _library()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        try:
            pieces = (p for chunk in chunks_of(texts) for p in _split(chunk, _TRAIN_CHARS))
            lib.train_from_iterator(pieces, trainer)
        except UnicodeEncodeError as e:  # a str that has no UTF-8: a lone surrogate
            raise SqlgptError(f"the corpus has a lone surrogate U+{ord(e.object[e.start]):04X}, "
                              f"which is not valid Unicode text") from None
        model = json.loads(lib.to_str())["model"]
        return cls(*_from_trainer(model["vocab"], model["merges"]))

    @classmethod
    def from_storage(cls, rows, state):
        """Inverse of (vocab_rows(), state()), every part checked."""
        check_state(state, ("pattern", "merges", "tokenizer_json"))
        if state["pattern"] != PATTERN:
            raise damaged(f"its pre-tokenization pattern {state['pattern']!r} is not the one "
                          f"this version of sqlgpt implements ({PATTERN!r})")
        raws = check_specials(read_rows(rows), special_names(*range(N_SPECIALS)))
        tok = cls(raws, _check_merges(raws, load_json(state, "merges")))
        _check_library_json(tok, load_json(state, "tokenizer_json"))
        return tok

    def state(self):
        return {"pattern": PATTERN,
                "merges": json.dumps([list(m) for m in self.merges], separators=(",", ":")),
                "tokenizer_json": self._lib.to_str()}

    def encode(self, text):
        return self._encode_batch([text])[0]

    def encode_chunks(self, chunks):
        batch, size = [], 0
        for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= _BATCH_CHARS:
                yield from self._encode_batch(batch)
                batch, size = [], 0
        if batch:
            yield from self._encode_batch(batch)

    def _encode_batch(self, texts):
        """One int32 array per text, the texts' pieces encoded by the library
        in one parallel call."""
        pieces = [list(_split(t)) for t in texts]
        try:
            encodings = self._lib.encode_batch_fast([p for ps in pieces for p in ps],
                                                    add_special_tokens=False)
        except TypeError:  # a str the library cannot hold: say where
            for t in texts:
                utf8(t)
            raise
        out, k = [], 0
        for ps in pieces:
            out.append(np.concatenate([np.array(e.ids, dtype=np.int32)
                                       for e in encodings[k:k + len(ps)]]))
            k += len(ps)
        return out


def _check_merges(raws, merges):
    """Merges as stored: pairs of non-special ids in rank order, each using
    bytes or earlier merges' tokens and making a token of the vocab, which
    holds every byte and nothing else."""
    if not isinstance(merges, list):
        raise damaged("its merges are not a JSON list of [left, right] pairs")
    id_of = {raw: i for i, raw in enumerate(raws) if raw is not None}
    live = {bytes([b]) for b in range(256)}
    if missing := sorted(live - set(id_of)):
        raise damaged(f"the byte {readable(missing[0])!r} has no token")
    seen = set()
    for rank, m in enumerate(merges):
        if not (isinstance(m, list) and len(m) == 2
                and all(type(x) is int and N_SPECIALS <= x < len(raws) for x in m)):
            raise damaged(f"merge {rank} ({m!r}) is not a pair of non-special token ids")
        left, right = raws[m[0]], raws[m[1]]
        if left not in live or right not in live:
            raise damaged(f"merge {rank} ({m!r}) uses a token no earlier merge makes")
        if left + right not in id_of:
            raise damaged(f"merge {rank} ({m!r}) makes {readable(left + right)!r}, "
                          f"which is not in the vocab")
        if tuple(m) in seen:
            raise damaged(f"merge {rank} ({m!r}) appears twice")
        seen.add(tuple(m))
        live.add(left + right)
    if len(live) != len(id_of):
        raise damaged(f"{len(id_of) - len(live)} tokens are neither a byte nor made by a merge")
    return merges


def _check_library_json(tok, stored):
    """The stored library JSON has the same vocab, merges and special ids."""
    mine = json.loads(tok._lib.to_str())
    try:
        same = (stored["model"]["vocab"] == mine["model"]["vocab"]
                and list(map(_pair, stored["model"]["merges"]))
                == list(map(_pair, mine["model"]["merges"]))
                and [(t["id"], t["content"]) for t in stored["added_tokens"]]
                == [(t["id"], t["content"]) for t in mine["added_tokens"]])
    except (KeyError, TypeError, AttributeError):
        same = False
    if not same:
        raise damaged("its tokenizer_json does not match its vocab and merges")


def from_library_json(text):
    """A BPETokenizer from a tokenizer.json in sqlgpt's layout (what export
    writes): the four specials at ids 0..3, sqlgpt's pre-tokenization and
    byte-level BPE. Another tokenizer (GPT-2's own, say, with its regex and
    <|endoftext|>) is a one-line error: its ids would not be sqlgpt's."""
    data = safe_json.loads(text, "tokenizer.json")
    try:
        model, pre = data["model"], data["pre_tokenizer"]
        vocab, merges = model["vocab"], [tuple(_pair(m)) for m in model["merges"]]
        added = [(t["id"], t["content"]) for t in data.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError):
        raise SqlgptError("tokenizer.json is not a tokenizers library BPE definition") from None
    reference = json.loads(_library().to_str())["pre_tokenizer"]
    if model.get("type") != "BPE" or pre != reference or \
            added[:N_SPECIALS] != list(enumerate(SPECIALS)):
        raise SqlgptError("tokenizer.json is not in sqlgpt's layout (byte-level BPE with "
                          "<pad> <unk> <bos> <eos> at ids 0-3 and sqlgpt's pre-tokenization); "
                          "only such tokenizers import")
    try:
        keys = sorted(vocab, key=vocab.get)
        if [vocab[k] for k in keys] != list(range(len(keys))) or keys[:N_SPECIALS] != \
                list(SPECIALS):
            raise ValueError
        raws = [None] * N_SPECIALS + [bytes(_BYTE_OF[c] for c in k) for k in keys[N_SPECIALS:]]
        merges = [(vocab[left], vocab[right]) for left, right in merges]
    except (KeyError, ValueError, TypeError):
        raise SqlgptError("tokenizer.json's vocab is not byte-level BPE ids 0..n-1") from None
    tok = BPETokenizer(raws, _check_merges(raws, [list(m) for m in merges]))
    _check_library_json(tok, data)
    return tok
