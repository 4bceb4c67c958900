import numpy as np
import pytest

from sqlgpt.errors import SqlgptError
from sqlgpt.tokenizers import PAD, UNK, WordTokenizer, words_of


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
    assert tok.vocab() == [(PAD, 0), ("b", 1), ("a", 2), (UNK, 3)]
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


def test_from_vocab_round_trips_and_rejects_damage():
    tok = WordTokenizer.build("x y z x", 5)
    assert WordTokenizer.from_vocab(tok.vocab()).words == tok.words
    with pytest.raises(SqlgptError):
        WordTokenizer.from_vocab([(PAD, 0), ("x", 1), ("y", 5), (UNK, 3)])
    with pytest.raises(SqlgptError):
        WordTokenizer.from_vocab([("x", 0), ("y", 1), (UNK, 2)])
