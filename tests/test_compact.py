"""sqlgpt compact: the model without its optimizer state, about a third
of the size, still generating and evaluating; it cannot resume."""
import os
import sqlite3

import numpy as np
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main

from conftest import TINY


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compact_keeps_the_model_and_drops_the_moments(tmp_path, small_corpus):
    db, small = tmp_path / "m.db", tmp_path / "small.db"
    assert run("train", small_corpus, "--db", db, "--iters", 10, "--save-every", 5, *TINY,
               "--keep", 2, "--embed-dim", 256).exit_code == 0
    before = db.read_bytes()
    result = run("compact", "--db", db, "-o", small)
    assert result.exit_code == 0, result.output
    assert db.read_bytes() == before  # the source is only read
    assert os.path.getsize(small) < 0.25 * os.path.getsize(db)  # 1/3 of the latest, no kept ones
    full, compacted = sqlgpt.load(db), sqlgpt.load(small)
    assert compacted.step == full.step and compacted.arch == full.arch
    assert all(np.array_equal(a, full.state_dict()[n]) for n, a in compacted.state_dict().items())
    assert run("check", "--db", small).exit_code == 0
    args = ["--prompt", "the king", "--max-tokens", 8, "--seed", 3]
    assert run("generate", "--db", small, *args).output == run("generate", "--db", db,
                                                               *args).output
    assert run("eval", "--db", small, small_corpus).output == run("eval", "--db", db,
                                                                  small_corpus).output
    conn = sqlite3.connect(small)
    assert conn.execute("SELECT count(*) FROM checkpoint_weights").fetchone() == (0,)
    assert conn.execute("SELECT DISTINCT length(m) FROM layers").fetchall() == [(0,)]
    assert conn.execute("SELECT count(*) FROM metrics").fetchone() == (10,)  # history stays
    conn.close()
    result = run("train", small_corpus, "--db", small, "--iters", 20, "--resume")
    assert result.exit_code == 1 and "is compacted" in result.output
    tuned = tmp_path / "tuned.db"
    result = run("train", small_corpus, "--db", tuned, "--iters", 2, "--init-from", small)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("small")) == \
        ["small.db"]


def test_compact_refuses_to_overwrite_and_damaged_rows_are_caught(tmp_path, trained_db):
    out = tmp_path / "c.db"
    assert run("compact", "--db", trained_db, "-o", out).exit_code == 0
    result = run("compact", "--db", trained_db, "-o", out)
    assert result.exit_code == 1 and "already exists" in result.output
    result = run("compact", "--db", tmp_path / "none.db", "-o", tmp_path / "x.db")
    assert result.exit_code == 1 and "does not exist" in result.output
    result = run("compact", "--db", trained_db, "-o", tmp_path / "no" / "x.db")
    assert result.exit_code == 1 and "is not a directory" in result.output
    conn = sqlite3.connect(out)
    conn.execute("UPDATE layers SET data = zeroblob(length(data)) WHERE layer = 0 AND "
                 "component = 'q' AND i = 2")
    conn.commit()
    conn.close()
    result = run("check", "--db", out)
    assert result.exit_code == 1 and "row 2 fails its checksum" in result.output
    assert store.integrity_check(out) == []
