"""Evaluation: the sliding windows score every token once, the loss equals
a token-by-token reference, `sqlgpt eval` reports it, and training records
evaluations and the best step."""
import json
import math
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.train.evaluate import windows

from conftest import TINY


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@given(st.integers(1, 300), st.integers(1, 40), st.data())
def test_windows_score_every_target_once(n_targets, T, data):
    T = min(T, n_targets)
    stride = data.draw(st.integers(1, T))
    spans = windows(n_targets, T, stride)
    scored = []
    for start, first in spans:
        assert 0 <= start and start + T <= n_targets
        scored += range(start + max(0, first), start + T)
    assert scored == list(range(n_targets))
    # after the first window every target has at least T - stride earlier tokens in its window
    for start, first in spans[1:]:
        assert max(0, first) >= T - stride or start == n_targets - T


@pytest.fixture(scope="module")
def char_db(tmp_path_factory, small_corpus):
    db = tmp_path_factory.mktemp("eval") / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 20, "--save-every", 10, *TINY,
                 "--tokenizer", "char", "--eval-every", 5, "--eval-iters", 2)
    assert result.exit_code == 0, result.output
    return db


def reference(model, ids):
    """Each token's loss and correctness from a window ending right before
    it (the most context the model allows), one logits call per token."""
    T = model.arch.seq_len
    losses, correct = [], 0
    for t in range(1, len(ids)):
        context = ids[max(0, t - T):t]
        logits = model.logits(context)[-1].astype(np.float64)
        log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        losses.append(-log_probs[ids[t]])
        correct += int(np.argmax(logits) == ids[t])
    return float(np.mean(losses)), correct / len(losses)


def test_stride_one_equals_the_token_by_token_reference(char_db):
    model = sqlgpt.load(char_db)
    text = "Before we proceed any further, hear me speak.\nSpeak, speak."
    result = model.evaluate(text, stride=1)
    loss, accuracy = reference(model, model.encode(text))
    assert result.tokens == len(model.encode(text)) - 1
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.accuracy == pytest.approx(accuracy)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    wide = model.evaluate(text)  # stride seq_len / 2: every token scored, less context
    assert wide.tokens == result.tokens and abs(wide.loss - loss) < 0.5


def test_sqlgpt_eval_prints_loss_perplexity_accuracy_tokens(char_db, tmp_path, small_corpus):
    held_out = tmp_path / "held.txt"
    held_out.write_text(small_corpus.read_text()[-3000:])
    out = run("eval", "--db", char_db, held_out, "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)  # progress goes to stderr
    assert set(report) == {"loss", "perplexity", "accuracy", "tokens"}
    assert report["tokens"] == 2999 and 0 < report["accuracy"] < 1
    assert report == sqlgpt.load(char_db).evaluate(paths=[held_out]).to_dict()
    plain = run("eval", "--db", char_db, held_out)
    assert plain.stdout.startswith("loss ") and "2,999 tokens" in plain.stdout
    assert "scoring: 1 of 1 windows" in plain.stderr or "windows (100%)" in plain.stderr


@pytest.mark.parametrize("content,args,message", [
    ("", [], "empty"), ("x", [], "fewer than 2 tokens"), ("enough text here", ["--stride", 99],
                                                         "stride must be from 1"),
])
def test_eval_bad_input_is_one_line(char_db, tmp_path, content, args, message):
    path = tmp_path / "t.txt"
    path.write_text(content)
    out = run("eval", "--db", char_db, path, *args)
    assert out.exit_code != 0 and message in out.output and "Traceback" not in out.output
    out = run("eval", "--db", char_db, tmp_path / "missing.txt")
    assert out.exit_code != 0 and "does not exist" in out.output


def test_training_records_evaluations_and_the_best_step(char_db):
    con = sqlite3.connect(char_db)
    rows = con.execute("SELECT step, loss, perplexity, accuracy, tokens FROM evaluations").fetchall()
    assert [r[0] for r in rows] == [5, 10, 15, 20]
    for step, loss, perplexity, accuracy, tokens in rows:
        assert perplexity == pytest.approx(math.exp(loss)) and tokens == 2 * 4 * 16
    best = json.loads(dict(con.execute("SELECT key, value FROM train_state"))["best_val"])
    assert best["loss"] == min(r[1] for r in rows)
    assert best["step"] == [r[0] for r in rows if r[1] == best["loss"]][0]
    # checkpoints carry the latest evaluation's loss
    assert con.execute("SELECT val_loss FROM checkpoints WHERE step = 20").fetchone()[0] == rows[-1][1]


def test_no_held_out_split(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 2, *TINY,
               "--val-fraction", 0).exit_code == 0
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 0
    assert con.execute("SELECT val_loss FROM checkpoints WHERE step = 2").fetchone()[0] is None


def test_a_text_shorter_than_the_context(char_db):
    result = sqlgpt.load(char_db).evaluate("Speak!")  # 5 targets, a 16-token context
    assert result.tokens == 5
