"""Checkpoint history: train --keep N keeps the weights of the last N
checkpoints and the best by validation loss, in the checkpoint's own
transaction; generate/eval --step and load(step=) use one."""
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.model.arch import preset
from sqlgpt.model.config import TrainConfig
from sqlgpt.errors import SqlgptError
from sqlgpt.cli import main

from conftest import TINY
from helpers import randomize, standin, word_tokenizer


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def kept(db):
    conn = store.open_database(db)
    try:
        return store.kept_steps(conn)
    finally:
        conn.close()


def test_the_last_n_and_the_best_are_kept(tmp_path):
    """val losses 3.0, 1.0, 2.0, 2.5, 2.2 at steps 10..50 with keep 2: the
    last two and step 20 (the best), the others pruned as each is saved."""
    arch = preset("lua", n_vocab=12, embed_dim=8, num_heads=2, num_layers=1, seq_len=4)
    cfg = TrainConfig(vocab_size=10, keep=2)
    rng = np.random.default_rng(0)
    model = randomize(standin(arch), rng)
    state = {"step": 0, "elapsed_s": 0.0, "rng": {}}
    db = tmp_path / "m.db"
    conn, lock = store.create_database(db, model, cfg, word_tokenizer(10), state)
    saved, history = {}, []
    for step, val in zip((10, 20, 30, 40, 50), (3.0, 1.0, 2.0, 2.5, 2.2)):
        randomize(model, rng)
        state = {**state, "step": step}
        store.save_checkpoint(conn, model, cfg, state, 3.0, val)
        saved[step] = {t.name: t.data.copy() for t in model.params}
        history.append(store.kept_steps(conn))
    conn.close()
    lock.release()
    assert history == [[0, 10], [10, 20], [20, 30], [20, 30, 40], [20, 40, 50]]
    for step in (20, 40):
        weights = sqlgpt.load(db, step=step).state_dict()
        assert all(np.array_equal(weights[n], saved[step][n]) for n in weights)
    assert sqlgpt.load(db, step=50).step == 50  # the latest, from the weight tables


def test_keep_through_training_and_step_everywhere(tmp_path, small_corpus):
    db, at_10 = tmp_path / "m.db", tmp_path / "at10.db"
    result = run("train", small_corpus, "--db", db, "--iters", 10, "--save-every", 5, *TINY,
                 "--keep", 3)
    assert result.exit_code == 0, result.output
    shutil.copy(db, at_10)
    shutil.copy(f"{db}.tokens", f"{at_10}.tokens")
    assert run("train", small_corpus, "--db", db, "--iters", 20, "--resume",
               "--save-every", 5).exit_code == 0
    kept_now = kept(db)
    best = sqlite3.connect(db).execute("SELECT step FROM checkpoints WHERE val_loss IS NOT NULL "
                                       "ORDER BY val_loss, step LIMIT 1").fetchone()[0]
    assert set(kept_now) == {10, 15, 20, best}
    old, ref = sqlgpt.load(db, step=10), sqlgpt.load(at_10)
    assert old.step == 10
    assert all(np.array_equal(a, ref.state_dict()[n]) for n, a in old.state_dict().items())
    args = ["--prompt", "the king", "--max-tokens", 8, "--seed", 1]
    assert run("generate", "--db", db, "--step", 10, *args).output == \
        run("generate", "--db", at_10, *args).output
    assert run("eval", "--db", db, "--step", 10, small_corpus, "--json").output == \
        run("eval", "--db", at_10, small_corpus, "--json").output
    info = run("info", "--db", db).output
    assert f"kept checkpoints (--step): {', '.join(map(str, kept_now))}" in info
    result = run("generate", "--db", db, "--step", 7)
    assert result.exit_code == 1 and "keeps no checkpoint at step 7" in result.output
    # --keep may change on resume: 0 keeps none from then on
    assert run("train", small_corpus, "--db", db, "--iters", 25, "--resume", "--keep", 0,
               "--save-every", 5).exit_code == 0
    assert kept(db) == []


def test_a_damaged_kept_checkpoint_is_refused(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 10, "--save-every", 5, *TINY,
               "--keep", 2).exit_code == 0
    conn = sqlite3.connect(db)
    conn.execute("UPDATE checkpoint_weights SET data = zeroblob(length(data)) "
                 "WHERE step = 5 AND name = 'wte' AND i = 3")
    conn.commit()
    conn.close()
    with pytest.raises(SqlgptError, match="checkpoint 5: weights of wte are damaged: row 3 "
                                          "fails its checksum"):
        sqlgpt.load(db, step=5)
    assert sqlgpt.load(db).step == 10  # the latest lives in the weight tables
    with pytest.raises(SqlgptError, match="step must be an integer"):
        sqlgpt.load(db, step=-1)
