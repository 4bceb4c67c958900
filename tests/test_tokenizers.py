import functools
import json
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlgpt.errors import SqlgptError
from sqlgpt.data.tokenizers import (BOS, EOS, PAD, TOKENIZERS, UNK, BPETokenizer, ByteTokenizer,
                               CharTokenizer, WordTokenizer, from_storage, readable, words_of)
from sqlgpt.data.tokenizers import bpe as bpe_module
from sqlgpt.data.tokenizers.bpe import BYTE_CHARS

SHAKESPEARE = (Path(__file__).parent.parent / "examples" / "tinyshakespeare.txt").read_text()
CORPUS = SHAKESPEARE[:50_000]
HELD_OUT = SHAKESPEARE[50_000:52_000]
VOCAB = {"word": 400, "char": 0, "byte": 0, "bpe": 400}

# arbitrary Unicode (hypothesis' text: every code point but surrogates) mixed
# with the cases that break tokenizers
SAMPLES = ["\r\n", "\t", "  ", "   x", "\n\n", " \n", "\x00", "\x0b\x0c", "é", "e\u0301", "😀",
           "👩‍👩‍👧", "🇫🇷", "東京", "한국어", "\u00a0", "\u3000", "\u2028", "\x85", "\ufeff",
           "\U0010ffff", "<eos>", "<pad>", "\\x80", "\\"]
TEXT = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SAMPLES)), max_size=20).map("".join)
# chunks cut where the corpus reader cuts: after a "\n" followed by non-whitespace
CHUNKS = st.lists(TEXT, max_size=6).map(lambda parts: ["x" + p + "\n" for p in parts])
PROPERTY = settings(deadline=None)  # the machine may be busy: no per-example time limit


@functools.cache
def built(kind):
    """Each kind built once on the first 50,000 characters of tinyshakespeare."""
    return TOKENIZERS[kind].build([CORPUS], VOCAB[kind])


def boundary_chunks(text, n, seed=0):
    """text cut into about n chunks at the corpus reader's boundaries."""
    cuts = [i for i in range(1, len(text)) if text[i - 1] == "\n" and not text[i].isspace()]
    cuts = sorted(np.random.default_rng(seed).choice(cuts, size=n - 1, replace=False).tolist())
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# --- word: the original's tokenizer, lossy by design ---

def test_sanitizing_is_the_same_for_building_and_encoding():
    text = "Time, time! THE time... isn't it: the time?"
    tok = WordTokenizer.build(text, 10)
    assert words_of(text) == ["time", "time", "the", "time", "isnt", "it", "the", "time"]
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # "time," maps to the word "time", not to <unk>
    assert tok.decode(ids) == "time time the time isnt it the time"


def test_ids_special_tokens_and_unknown_words():
    tok = WordTokenizer.build("b a b c b a", 2)
    assert tok.words == ["b", "a"]
    assert tok.vocab_rows() == [(0, PAD, None), (1, "b", b"b"), (2, "a", b"a"), (3, UNK, None)]
    assert (tok.n_ids, tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) \
        == (4, 2, 0, 3, None, None)
    np.testing.assert_array_equal(tok.encode("a zebra b"), [2, 3, 1])
    assert tok.decode([0, 1, 3, 2]) == f"b {UNK} a"


def test_ties_are_broken_alphabetically_whatever_the_order():
    one = WordTokenizer.build("pear apple fig apple pear fig kiwi", 3)
    two = WordTokenizer.build("kiwi fig pear fig apple pear apple", 3)
    assert one.words == two.words == ["apple", "fig", "pear"]


def test_unicode_words_are_kept():
    tok = WordTokenizer.build("Über straße café — naïve über", 10)
    assert tok.words[0] == "über"
    assert set(tok.words) == {"über", "straße", "café", "naïve"}


def test_word_tokenizer_is_exactly_as_lossy_as_the_original():
    # values from the module as it was before tokenizers became a package
    text = ("The CAT's 3 cats_and_dogs, naïve café\u0301 — ΣΊΣΥΦΟΣ İstanbul straße 東京 ½ x² "
            "snake_case; don't!? Über-cool 42.")
    assert words_of(text) == ["the", "cats", "3", "catsanddogs", "naïve", "café", "σίσυφος",
                              "i\u0307stanbul", "straße", "東京", "½", "x²", "snakecase", "dont",
                              "übercool", "42"]
    tok = WordTokenizer.build(text + " the cat the", 8)
    assert tok.words == ["the", "3", "42", "café", "cat", "cats", "catsanddogs", "dont"]
    assert tok.encode(text).tolist() == [1, 6, 2, 7, 9, 4, 9, 9, 9, 9, 9, 9, 9, 8, 9, 3]
    assert tok.decode(tok.encode(text)) == ("the cats 3 catsanddogs <unk> café <unk> <unk> <unk> "
                                            "<unk> <unk> <unk> <unk> dont <unk> 42")


def test_word_build_streams_chunks():
    chunks = boundary_chunks(CORPUS, 20)
    assert WordTokenizer.build(iter(chunks), 400).words == built("word").words


def test_word_reads_version_1_rows_without_bytes():
    tok = built("word")
    rows = [(i, token, None) for i, token, _ in tok.vocab_rows()]
    assert from_storage("word", rows, {}).words == tok.words


# --- char ---

def test_char_ids_alphabet_and_unknown():
    tok = CharTokenizer.build(["banana", "!\n"], 0)
    assert tok.alphabet == "\n!abn"
    assert (tok.n_ids, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (9, 0, 1, 2, 3)
    assert tok.encode("nab!?").tolist() == [8, 6, 7, 5, 1]
    assert tok.decode([8, 6, 1, 0, 2, 3, 5]) == "na\ufffd!"
    assert tok.pieces([0, 1, 2, 3, 4]) == [PAD, UNK, BOS, EOS, "\\n"]


def test_char_vocab_size_keeps_the_most_frequent_ties_by_code_point():
    assert CharTokenizer.build("ccbbbaaa", 2).alphabet == "ab"  # a, b tie at 3: both beat c
    assert CharTokenizer.build("zzyx", 2).alphabet == "xz"  # x, y tie at 1: x has the smaller code
    assert CharTokenizer.build("abc", 10).alphabet == "abc"
    with pytest.raises(SqlgptError):
        CharTokenizer.build("abc", -1)


@PROPERTY
@given(text=TEXT)
def test_char_round_trip_within_the_alphabet_and_unk_outside(text):
    tok = built("char")
    inside = "".join(c for c in text if c in tok.alphabet)
    assert tok.decode(tok.encode(inside)) == inside
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert [i == tok.unk_id for i in ids.tolist()] == [c not in tok.alphabet for c in text]
    assert tok.decode(ids) == "".join(c if c in tok.alphabet else "\ufffd" for c in text)


# --- byte ---

def test_byte_ids():
    tok = ByteTokenizer.build(["ignored"], 12345)
    assert (tok.n_ids, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (260, 0, 1, 2, 3)
    assert tok.encode("A\x00é").tolist() == [4 + 65, 4, 4 + 0xC3, 4 + 0xA9]
    assert tok.decode([4 + 65, 4 + 0xC3]) == "A\ufffd"  # a cut character is U+FFFD
    assert tok.pieces([4 + 0xC3, 4 + 92, 3]) == ["\\xc3", "\\\\", EOS]


@PROPERTY
@given(text=TEXT)
def test_byte_round_trip_on_any_text(text):
    tok = built("byte")
    assert tok.decode(tok.encode(text)) == text


# --- bpe ---

WS = b" \t\n\x0b\x0c\r"


def scan(data):
    """bpe.py's pre-tokenization rule as its docstring states it, written the
    way a C scanner would be."""
    pieces, i, n = [], 0, len(data)

    def word(j):
        return j < n and data[j] not in WS
    while i < n:
        j = i + 1
        if word(i) or (data[i] == 32 and word(j)):  # a, b: [space] non-whitespace run
            while word(j):
                j += 1
        elif data[i] == 32:  # c: spaces, the last one left to a following word
            while j < n and data[j] == 32:
                j += 1
            j -= word(j)
        pieces.append(data[i:j])  # d: one other whitespace byte
        i = j
    return pieces


def merged(seq, pair, new):
    out, k = [], 0
    while k < len(seq):
        if tuple(seq[k:k + 2]) == pair:
            out.append(new)
            k += 2
        else:
            out.append(seq[k])
            k += 1
    return out


def reference_train(text, vocab_size):
    """Plain byte-level BPE: count adjacent pairs over the pieces, merge the
    most frequent; ties go to the smallest (left id, right id), ids numbered
    as the library numbers them (specials, the bytes in the order of their
    ByteLevel characters, then new tokens)."""
    tokens = [None] * 4 + sorted((bytes([b]) for b in range(256)), key=lambda t: BYTE_CHARS[t[0]])
    id_of = {t: i for i, t in enumerate(tokens) if t is not None}
    words = Counter(scan(text.encode()))
    seqs = {w: [id_of[bytes([b])] for b in w] for w in words}
    merges = []
    while len(tokens) < vocab_size:
        pairs = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new = tokens[best[0]] + tokens[best[1]]
        if new not in id_of:
            id_of[new] = len(tokens)
            tokens.append(new)
        merges.append(best)
        seqs = {w: merged(seq, best, id_of[new]) for w, seq in seqs.items()}
    return tokens, merges


def reference_encode(tokens, merges, text):
    rank = {m: r for r, m in enumerate(merges)}
    id_of = {t: i for i, t in enumerate(tokens) if t is not None}
    out = []
    for piece in scan(text.encode()):
        seq = [id_of[bytes([b])] for b in piece]
        while ranked := [(rank[p], k) for k, p in enumerate(zip(seq, seq[1:])) if p in rank]:
            _, k = min(ranked)  # the lowest-rank pair, leftmost first
            seq[k:k + 2] = [id_of[tokens[seq[k]] + tokens[seq[k + 1]]]]
        out += seq
    return out


def test_bpe_merges_and_ids_equal_a_plain_python_bpe():
    text = SHAKESPEARE[:20_000]
    tokens, merges = reference_train(text, 380)
    tok = BPETokenizer.build([text], 380)
    assert [raw for _, _, raw in tok.vocab_rows()] == tokens
    assert tok.merges == merges
    for sample in [text[:500], HELD_OUT, "Hello,  World!\r\n\tcafé 東京 😀  \n  x", ""]:
        assert tok.encode(sample).tolist() == reference_encode(tokens, merges, sample)


@PROPERTY
@given(text=TEXT)
def test_bpe_pre_tokenization_is_the_documented_scanner(text):
    byte_of = {c: b for b, c in enumerate(BYTE_CHARS)}
    pieces = built("bpe")._lib.pre_tokenizer.pre_tokenize_str(text)
    assert [bytes(byte_of[c] for c in p) for p, _ in pieces] == scan(text.encode())


def test_bpe_byte_chars_are_the_librarys():
    from tokenizers import pre_tokenizers
    assert sorted(BYTE_CHARS) == sorted(pre_tokenizers.ByteLevel.alphabet())
    lib = built("bpe")._lib.pre_tokenizer
    for b in range(128):
        assert lib.pre_tokenize_str(chr(b))[0][0] == BYTE_CHARS[b]
    assert lib.pre_tokenize_str("é")[0][0] == BYTE_CHARS[0xC3] + BYTE_CHARS[0xA9]


@PROPERTY
@given(text=TEXT)
def test_bpe_round_trip_on_any_text(text):
    tok = built("bpe")
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids >= 4).all()  # never a special token
    assert tok.decode(ids) == text


def test_bpe_vocab_size_counts_every_id():
    assert built("bpe").n_ids == 400
    assert BPETokenizer.build(["ab"], 260).n_ids == 260
    with pytest.raises(SqlgptError, match="at least 260"):
        BPETokenizer.build(["ab"], 259)


def test_bpe_never_learns_a_special_from_text():
    tok = BPETokenizer.build(["hello\n<eos>\nworld\n<eos>\n<pad>\n" * 50], 300)
    raws = [raw for _, _, raw in tok.vocab_rows()]
    assert b"<eos" in raws and b"<eos>" not in raws and b"<pad>" not in raws
    ids = tok.encode("a\n<eos>\n<pad>")
    assert (ids >= 4).all() and tok.decode(ids) == "a\n<eos>\n<pad>"
    assert from_storage("bpe", tok.vocab_rows(), tok.state()).encode("<eos>").tolist() \
        == tok.encode("<eos>").tolist()


def test_bpe_long_text_is_cut_without_changing_the_ids():
    tok, text = built("bpe"), SHAKESPEARE[:300_000]
    assert len(text) > 2 * bpe_module._PIECE_CHARS
    expect = tok._lib.encode(text, add_special_tokens=False).ids  # the library, uncut
    assert tok.encode(text).tolist() == expect
    chunks = boundary_chunks(text, 60)
    assert np.concatenate(list(tok.encode_chunks(chunks))).tolist() == expect


def test_bpe_partial_characters_read_as_escaped_bytes():
    tok = BPETokenizer.build(["日本語のテキストです。東京は大きい。\n" * 40], 320)
    tokens = [token for _, token, _ in tok.vocab_rows()]
    partial = [t for t in tokens if "\\x" in t]
    assert partial  # merges of the first bytes of characters
    assert all("\ufffd" not in t for t in tokens)
    assert all("\ufffd" not in p for p in tok.pieces(tok.encode("日本語、韓国語 😀")))


# --- every kind ---

KINDS = list(TOKENIZERS)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_chunks_equals_encode_of_the_whole(kind):
    tok = built(kind)
    chunks = boundary_chunks(SHAKESPEARE[:200_000], 37)
    got = list(tok.encode_chunks(iter(chunks)))
    assert len(got) == len(chunks) and all(a.dtype == np.int32 for a in got)
    assert np.concatenate(got).tolist() == tok.encode("".join(chunks)).tolist()


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(chunks=CHUNKS)
def test_encode_chunks_equals_encode_on_any_text(kind, chunks):
    tok = built(kind)
    got = [a.tolist() for a in tok.encode_chunks(chunks)]
    assert len(got) == len(chunks)
    assert sum(got, []) == tok.encode("".join(chunks)).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_from_storage_reproduces_the_tokenizer(kind):
    tok = built(kind)
    rows = tok.vocab_rows()
    assert [i for i, _, _ in rows] == list(range(tok.n_ids))
    again = from_storage(kind, reversed(rows), tok.state())  # any order, any iterable
    assert (again.kind, again.n_ids, again.pad_id, again.unk_id, again.bos_id, again.eos_id) \
        == (tok.kind, tok.n_ids, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id)
    assert again.vocab_rows() == rows and again.state() == tok.state()
    text = HELD_OUT + "\ncafé 東京 😀 <eos>\x00"
    ids = tok.encode(text)
    assert again.encode(text).tolist() == ids.tolist()
    assert again.decode(ids) == tok.decode(ids)
    assert again.pieces(ids) == tok.pieces(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_rows_survive_sqlite(kind):
    tok = built(kind)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE vocab (id INTEGER PRIMARY KEY, token TEXT NOT NULL, bytes BLOB)")
    db.executemany("INSERT INTO vocab VALUES (?, ?, ?)", tok.vocab_rows())
    db.execute("CREATE TABLE tokenizer (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.executemany("INSERT INTO tokenizer VALUES (?, ?)", tok.state().items())
    again = from_storage(kind, db.execute("SELECT id, token, bytes FROM vocab"),
                         dict(db.execute("SELECT key, value FROM tokenizer")))
    assert again.encode(HELD_OUT).tolist() == tok.encode(HELD_OUT).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_and_vocab_rows_are_readable(kind):
    tok = built(kind)
    rows = tok.vocab_rows()
    tokens = [token for _, token, _ in rows]
    assert len(set(tokens)) == len(tokens)
    for i, token, raw in rows:
        assert "\ufffd" not in token
        assert all(c >= " " and c != "\x7f" for c in token)  # no control characters
        assert token in (PAD, UNK, BOS, EOS) if raw is None else token == readable(raw)
    ids = tok.encode(HELD_OUT + " \t😀\x00")
    assert all("\ufffd" not in p for p in tok.pieces(ids))


def test_readable_escapes_what_is_not_plain_text():
    assert readable("café 東京".encode()) == "café 東京"
    assert readable(b"a\\b\n\t\r\x00\x1b\x7f") == "a\\\\b\\n\\t\\r\\x00\\x1b\\x7f"
    assert readable("東".encode()[:2]) == "\\xe6\\x9d"
    assert readable(b"\xff\xc3(\xed\xa0\x80") == "\\xff\\xc3(\\xed\\xa0\\x80"  # surrogate bytes too
    assert readable(b"\\x80") != readable(b"\x80")


@pytest.mark.parametrize("kind", KINDS)
def test_decode_rejects_bad_ids(kind):
    tok = built(kind)
    assert tok.decode([]) == "" and tok.pieces([]) == []
    for bad in ([tok.n_ids], [-1], [0.5]):
        with pytest.raises(SqlgptError) as e:
            tok.decode(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(SqlgptError):
        tok.pieces([tok.n_ids])


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_specials_decode_to_nothing_and_unk_to_the_replacement_character(kind):
    tok = built(kind)
    assert tok.decode([tok.pad_id, tok.bos_id, tok.eos_id]) == ""
    assert tok.decode([tok.unk_id]) == "\ufffd"
    assert tok.pieces([0, 1, 2, 3]) == [PAD, UNK, BOS, EOS]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_a_lone_surrogate_is_a_one_line_error(kind):
    with pytest.raises(SqlgptError, match="surrogate"):
        built(kind).encode("a\ud800b")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_lone_surrogate_in_the_corpus_is_a_one_line_error(kind):
    with pytest.raises(SqlgptError, match="surrogate"):
        TOKENIZERS[kind].build(["abc\nx\ud800y\n"], 300)


@pytest.mark.parametrize("kind", KINDS)
def test_the_corpus_readers_errors_come_through_build(kind):
    def corpus():
        yield "abc\n"
        raise SqlgptError("corpus.txt: invalid UTF-8 at byte 4")
    if kind == "byte":  # it reads nothing
        assert ByteTokenizer.build(corpus(), 0).n_ids == 260
        return
    with pytest.raises(SqlgptError, match="corpus.txt: invalid UTF-8 at byte 4"):
        TOKENIZERS[kind].build(corpus(), 300)


def test_unknown_kind():
    with pytest.raises(SqlgptError, match="unknown tokenizer kind"):
        from_storage("sentencepiece", [], {})


# --- damaged storage: one-line SqlgptError, never another exception ---

def put(rows, i, token, raw):
    return [(i, token, raw) if j == i else r for j, r in enumerate(rows)]


def in_rows(f):
    return lambda rows, state: (f(rows), state)


def in_state(**changes):
    return lambda rows, state: (rows, {**state, **changes})


def in_merges(f):
    return lambda rows, state: in_state(merges=json.dumps(f(json.loads(state["merges"]))))(rows, state)


def in_library_json(f):
    def damage(rows, state):
        lib = json.loads(state["tokenizer_json"])
        f(lib)
        return rows, {**state, "tokenizer_json": json.dumps(lib)}
    return damage


def swap(rows, i, j):
    return put(put(rows, i, *rows[j][1:]), j, *rows[i][1:])


ANY = [
    ("an id missing", in_rows(lambda r: r[:5] + r[6:])),
    ("an id twice", in_rows(lambda r: r + [r[5]])),
    ("an id that is text", in_rows(lambda r: r[:5] + [("5", *r[5][1:])] + r[6:])),
    ("a short row", in_rows(lambda r: r[:5] + [r[5][:2]] + r[6:])),
    ("not rows", in_rows(lambda r: None)),
    ("token text not its bytes", in_rows(lambda r: put(r, 5, r[5][1] + "?", r[5][2]))),
    ("bytes that are not a blob", in_rows(lambda r: put(r, 5, r[5][1], r[5][1]))),
    ("two tokens with the same bytes", in_rows(lambda r: put(r, 5, *r[6][1:]))),
    ("a special renamed", in_rows(lambda r: put(r, 0, "<nothing>", None))),
    ("a special with bytes", in_rows(lambda r: put(r, 0, "x", b"x"))),
    ("a token without bytes", in_rows(lambda r: put(r, 5, "x", None))),
    ("state not a table", lambda rows, state: (rows, [("pattern", "x")])),
    ("an extra state key", in_state(extra="1")),
]
# (a word's bytes may be missing: version-1 files have none)
DAMAGES = [(kind, *d) for kind in KINDS for d in ANY
           if (kind, d[0]) != ("word", "a token without bytes")] + [
    ("word", "<unk> not last", in_rows(lambda r: swap(r, 1, len(r) - 1))),
    ("word", "not a word", in_rows(lambda r: put(r, 1, "Hello", b"Hello"))),
    ("word", "only specials", in_rows(lambda r: [r[0], (1, UNK, None)])),
    ("char", "two characters in a token", in_rows(lambda r: put(r, 4, "ab", b"ab"))),
    ("char", "half a character", in_rows(lambda r: put(r, 4, "\\xc3", b"\xc3"))),
    ("char", "out of code-point order", in_rows(lambda r: swap(r, 4, 5))),
    ("byte", "a byte replaced", in_rows(lambda r: put(r, 4, "\\xff\\xff", b"\xff\xff"))),
    ("byte", "a byte missing", in_rows(lambda r: r[:-1])),
    ("bpe", "a state key missing", lambda rows, state: (rows, {"pattern": state["pattern"],
                                                              "merges": state["merges"]})),
    ("bpe", "another pattern", in_state(pattern=r"\S+|\s")),
    ("bpe", "merges not JSON", in_state(merges="[[300, 4]")),
    ("bpe", "merges not a list", in_state(merges='{"a": 1}')),
    ("bpe", "a merge of an unknown id", in_merges(lambda m: [[9999, 4]] + m[1:])),
    ("bpe", "a merge of a special", in_merges(lambda m: [[0, 4]] + m[1:])),
    ("bpe", "a merge that is not a pair", in_merges(lambda m: [[4]] + m[1:])),
    ("bpe", "a merge of text ids", in_merges(lambda m: [["4", "5"]] + m[1:])),
    ("bpe", "a merge twice", in_merges(lambda m: m + m[-1:])),
    ("bpe", "merges out of order", in_merges(lambda m: m[::-1])),
    ("bpe", "a merge dropped", in_merges(lambda m: m[:-1])),
    ("bpe", "a merge that makes no token", in_merges(lambda m: [[4, 4]] + m[1:])),
    ("bpe", "a byte missing", in_rows(lambda r: put(r, 4, "\\xff\\xff", b"\xff\xff"))),
    ("bpe", "tokenizer_json not JSON", in_state(tokenizer_json="{")),
    ("bpe", "tokenizer_json without a model", in_library_json(lambda lib: lib.pop("model"))),
    ("bpe", "tokenizer_json with another vocab",
     in_library_json(lambda lib: lib["model"]["vocab"].update({"zzzz": 5}))),
    ("bpe", "tokenizer_json with other merges",
     in_library_json(lambda lib: lib["model"]["merges"].reverse())),
    ("bpe", "tokenizer_json with other specials",
     in_library_json(lambda lib: lib["added_tokens"][0].update(content="<s>"))),
]


@pytest.mark.parametrize("kind, what, damage", DAMAGES, ids=[f"{k}: {w}" for k, w, _ in DAMAGES])
def test_damaged_storage_is_a_one_line_error(kind, what, damage):
    tok = built(kind)
    rows, state = damage(tok.vocab_rows(), tok.state())
    with pytest.raises(SqlgptError) as e:
        from_storage(kind, rows, state)
    assert "\n" not in str(e.value) and str(e.value)
