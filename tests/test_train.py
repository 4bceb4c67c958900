"""Training: it learns, resumes exactly, and refuses to clobber a database."""
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main
from sqlgpt.tokenizers import WordTokenizer
from sqlgpt.train import split_tokens

from conftest import CORPUS, TINY


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def weights_bytes(db):
    conn = store.open_database(db)
    blobs = [row for table in store.WEIGHT_TABLES for row in conn.execute(store.SELECT_SQL[table])]
    conn.close()
    return blobs


def test_training_learns_well_below_the_unigram_entropy(tmp_path):
    """On Tiny Shakespeare the held-out loss ends well below the cross-entropy
    of a unigram model fitted to the training split."""
    db = tmp_path / "m.db"
    result = run("train", CORPUS, "--db", db, "--iters", 400, "--embed-dim", 64, "--heads", 4,
                 "--layers", 2, "--seq-len", 64, "--batch-size", 16, "--lr", 1e-3,
                 "--dropout", 0.0, "--save-every", 400, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 400 and summary["tokens_per_sec"] > 0
    model = sqlgpt.load(db)
    tokens = model.encode(CORPUS.read_text())
    train, val = split_tokens(tokens, 64)
    counts = np.bincount(train, minlength=model.config["vocab_size"] + 2) + 1e-9
    unigram = -np.mean(np.log(counts[val] / counts.sum()))
    conn = store.open_database(db)
    val_loss = conn.execute("SELECT val_loss FROM checkpoints WHERE step = 400").fetchone()[0]
    conn.close()
    assert val_loss < unigram - 0.3, (val_loss, unigram)


@pytest.mark.parametrize("dropout", ["0.0", "0.2"])
def test_resume_equals_one_uninterrupted_run(tmp_path, small_corpus, dropout):
    straight, split = tmp_path / "straight.db", tmp_path / "split.db"
    common = [*TINY, "--dropout", dropout, "--save-every", "7"]
    assert run("train", small_corpus, "--db", straight, "--iters", 20, *common).exit_code == 0
    assert run("train", small_corpus, "--db", split, "--iters", 6, *common).exit_code == 0
    for stop in (13, 20):
        result = run("train", small_corpus, "--db", split, "--iters", stop, "--save-every", 7,
                     "--resume")
        assert result.exit_code == 0, result.output
    assert weights_bytes(straight) == weights_bytes(split)
    losses = []
    for db in (straight, split):
        conn = store.open_database(db)
        losses.append(conn.execute("SELECT step, loss FROM metrics ORDER BY step").fetchall())
        conn.close()
    assert losses[0] == losses[1] and len(losses[0]) == 20


def test_existing_database_needs_resume_or_overwrite(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    before = db.read_bytes()
    result = run("train", small_corpus, "--db", db, "--iters", 5, *TINY)
    assert result.exit_code != 0 and "--resume" in result.output and "--overwrite" in result.output
    assert db.read_bytes() == before
    result = run("train", small_corpus, "--db", db, "--iters", 5, *TINY, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(db).step == 5


def test_resume_refuses_changed_model_options_and_another_corpus(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    before = db.read_bytes()
    result = run("train", small_corpus, "--db", db, "--iters", 40, "--resume", "--embed-dim", 64)
    assert result.exit_code != 0 and "--embed-dim" in result.output
    other = tmp_path / "other.txt"
    other.write_text("completely different words " * 100)
    result = run("train", other, "--db", db, "--iters", 40, "--resume")
    assert result.exit_code != 0 and "same file" in result.output
    assert db.read_bytes() == before


def test_nan_loss_never_reaches_a_checkpoint(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 10, *TINY, "--lr", "1e30",
                 "--max-bad-steps", 3)
    assert result.exit_code != 0
    assert "NaN" in result.output and "Traceback" not in result.output
    model = sqlgpt.load(db)  # the last good checkpoint loads: finite weights
    assert all(np.isfinite(w).all() for w in model.state_dict().values())


def test_small_corpus_with_fewer_words_than_vocab_size(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log " * 20)
    db = tmp_path / "m.db"
    result = run("train", corpus, "--db", db, "--iters", 3, "--embed-dim", 16, "--heads", 2,
                 "--layers", 1, "--seq-len", 8, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    model = sqlgpt.load(db)
    assert model.config["vocab_size"] == 8
    assert model.state_dict()["head"].shape == (16, 10)
