"""What every tokenizer shares: the special tokens, the table of tokens by id
(exact bytes and readable text), decoding by that table, and the checks that
turn a damaged vocab or state into one-line errors.

Readable text (the vocab table's `token`, `pieces()`): the token's UTF-8
text with a backslash written as \\\\, \\n \\t \\r as such, the other ASCII
controls (0x00-0x1f, 0x7f) and every byte that is not part of well-formed
UTF-8 as \\xNN (two lower-case hex digits). So distinct tokens always read
differently, a NUL never reaches a TEXT column, and a BPE token that holds
half a character shows its bytes (\\xe4\\xbd) instead of U+FFFD.
"""
import codecs
from collections.abc import Mapping

import numpy as np

from .. import safe_json
from ...contract import SPECIALS  # ids 0..3 for char, byte and bpe
from ...errors import SqlgptError

PAD, UNK, BOS, EOS = SPECIALS
N_SPECIALS = len(SPECIALS)

_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROLS.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def readable(raw):
    """A token's bytes as readable text (see the module docstring)."""
    # 0x5c never occurs inside a multi-byte UTF-8 sequence, so doubling it
    # first cannot break a character; "backslashreplace" then writes each byte
    # that is not well-formed UTF-8 as \xNN.
    text = bytes(raw).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROLS)


def utf8(text):
    """text's UTF-8 bytes; a lone surrogate (which has none) is a one-line error."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _surrogate(e) from None


def codepoints(text):
    """text's code points as a uint32 array (one per character)."""
    try:
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError as e:
        raise _surrogate(e) from None


def _surrogate(e):
    return SqlgptError(f"the text has a lone surrogate U+{ord(e.object[e.start]):04X} at "
                       f"character {e.start}, which is not valid Unicode text")


class ByteStream:
    """Ids to text one at a time by their bytes (see Tokenizer.stream): a
    character cut between tokens waits for its last byte, a byte that
    cannot begin or continue one is U+FFFD, as decode's "replace" gives."""

    def __init__(self, bytes_of, ids):
        self._bytes_of = bytes_of
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._utf8.decode(b"".join(bytes_of[i] for i in ids.tolist()))

    def push(self, token):
        return self._utf8.decode(self._bytes_of[token])

    def finish(self):
        return self._utf8.decode(b"", final=True)


def special_names(pad_id, unk_id, bos_id, eos_id):
    """{id: name} of the special tokens a kind has (an id of None: it has none)."""
    return {i: name for i, name in zip((pad_id, unk_id, bos_id, eos_id), SPECIALS)
            if i is not None}


def chunks_of(texts):
    """build()'s corpus: an iterable of str chunks (a lone str is one chunk,
    not an iterable of characters)."""
    return (texts,) if isinstance(texts, str) else texts


class Tokenizer:
    """The shared part: every id 0..n_ids-1 has its exact bytes (None for a
    special token) and its readable text. Subclasses set the special ids and
    call _set_table(raws) from their __init__."""

    kind = None
    pad_id = unk_id = bos_id = eos_id = None
    unk_bytes = "\ufffd".encode()  # what <unk> decodes to (the word tokenizer writes "<unk>")

    def _set_table(self, raws, names=None):
        """raws: each id's bytes (None for a special); names: each special's
        text (default: its role's, <pad> etc.)."""
        self._raws = [None if r is None else bytes(r) for r in raws]
        if names is None:
            names = special_names(self.pad_id, self.unk_id, self.bos_id, self.eos_id)
        self._text = np.array([names[i] if r is None else readable(r)
                               for i, r in enumerate(self._raws)], dtype=object)
        out = [self.unk_bytes if i == self.unk_id else r or b"" for i, r in enumerate(self._raws)]
        self._bytes_of = out  # each id's decoded bytes, for streams
        # decode gathers from one flat buffer: id i's bytes are blob[start[i]:start[i]+size[i]]
        self._size = np.array([len(o) for o in out], dtype=np.int64)
        self._start = np.cumsum(self._size) - self._size
        self._blob = np.frombuffer(b"".join(out) or b"\0", dtype=np.uint8)

    @property
    def n_ids(self):
        """Token ids, special ones included: the rows of the model's wte."""
        return len(self._raws)

    def encode_chunks(self, chunks):
        """One int32 array per chunk; their concatenation is
        encode("".join(chunks)) when chunks are cut where the corpus reader
        cuts them (right after a "\\n" that is followed by non-whitespace)."""
        return map(self.encode, chunks)

    def decode(self, ids):
        """The tokens' bytes joined as they came, as UTF-8 (a cut character
        becomes U+FFFD); <pad>, <bos>, <eos> are "", <unk> is U+FFFD."""
        ids = self._ids(ids)
        size = self._size[ids]
        ends = np.cumsum(size)
        # for each output byte, its offset in the blob: the token's start plus
        # its position within the token
        total = int(ends[-1]) if len(ids) else 0
        at = np.repeat(self._start[ids] - (ends - size), size) + np.arange(total)
        return self._blob[at].tobytes().decode("utf-8", "replace")

    def stream(self, ids=()):
        """A decoder of ids that come one at a time, after ids: its push(id)
        gives the text that id adds (in O(1)), finish() what is left; the
        pieces joined are decode(ids + pushed)[len(decode(ids)):] wherever
        decode(ids) ends on a whole character."""
        return ByteStream(self._bytes_of, self._ids(ids))

    def token_bytes(self, token):
        """The bytes id token decodes to (b"" for <pad>, <bos>, <eos>)."""
        return self._bytes_of[self._ids([token])[0]]

    def pieces(self, ids):
        """A readable piece per id (specials as "<eos>" etc.)."""
        return self._text[self._ids(ids)].tolist()

    def vocab_rows(self):
        """(id, readable token, exact bytes or None for a special), every id once."""
        return [(i, self._text[i], raw) for i, raw in enumerate(self._raws)]

    def state(self):
        """What the vocab rows do not hold (nothing, unless a kind says so)."""
        return {}

    def _ids(self, ids):
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            return ids.astype(np.int64)
        if ids.dtype.kind not in "iu":
            raise SqlgptError(f"token ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.n_ids:
            raise SqlgptError(f"token id out of range [0, {self.n_ids - 1}]")
        return ids.astype(np.int64)


# --- reading a stored tokenizer back: every check is a one-line SqlgptError ---

def damaged(what):
    return SqlgptError(f"the tokenizer is damaged: {what}")


def read_rows(rows):
    """The vocab rows (id, token, raw) in any order -> [(token, raw)] by id,
    checked: ids exactly 0..n-1, token text, raw bytes or None (special),
    token == readable(raw)."""
    try:
        rows = [tuple(r) for r in rows]
    except TypeError:
        raise damaged("the vocab rows are not (id, token, bytes) rows") from None
    by_id = {}
    for row in rows:
        if len(row) != 3:
            raise damaged(f"a vocab row has {len(row)} fields, not (id, token, bytes)")
        i, token, raw = row
        if not isinstance(i, int) or isinstance(i, bool) or not isinstance(token, str):
            raise damaged(f"vocab row {row[:2]!r} is not an integer id with text")
        if raw is not None:
            if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) == 0:
                raise damaged(f"token {i} has bytes {raw!r}, not a non-empty blob")
            raw = bytes(raw)
            if token != readable(raw):
                raise damaged(f"token {i} reads {token!r} but its bytes read {readable(raw)!r}")
        if i in by_id:
            raise damaged(f"token id {i} appears twice")
        by_id[i] = (token, raw)
    if set(by_id) != set(range(len(by_id))):
        raise damaged(f"the token ids are not exactly 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def check_specials(entries, names):
    """Each special id holds its name with no bytes, only those lack bytes,
    and no two tokens have the same bytes -> the raws by id."""
    for i, (token, raw) in enumerate(entries):
        if i in names and (token, raw) != (names[i], None):
            raise damaged(f"token {i} must be the special {names[i]}, found {token!r}")
        if i not in names and raw is None:
            raise damaged(f"token {i} ({token!r}) has no bytes but is not a special token")
    raws = [raw for _, raw in entries]
    if len(set(raws)) != len(raws) - len(names) + 1:  # the specials' None counts once
        raise damaged("two tokens have the same bytes")
    return raws


def check_state(state, keys):
    """state is exactly {key: text} for these keys."""
    if not isinstance(state, Mapping):
        raise damaged("its state is not a key/value table")
    if set(state) != set(keys):
        raise damaged(f"its state has keys {sorted(state)} instead of {sorted(keys)}")
    for k in keys:
        if not isinstance(state[k], str):
            raise damaged(f"its state {k!r} is not text")
    return state


def load_json(state, key):
    try:
        return safe_json.loads(state[key], f"its state {key!r}")
    except SqlgptError as e:
        raise damaged(str(e)) from None
