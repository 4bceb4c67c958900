"""Hostile databases: the loader is fuzzed with random truncations, bit
flips, wrong BLOB lengths, missing rows, bad config values and extra
triggers/views. Every case must end in a clean SqlgptError or a successful
load: never another exception, a crash or a hang.

The database is written through store.py alone, for an architecture whose
rows fill every weight table: the gpt2 preset with an untied head (norm
gains and biases in layers and norms, the head in head)."""
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import load_db, write_db
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlgpt.model import arch
from sqlgpt.model.config import TrainConfig
from sqlgpt.errors import SqlgptError

CASES = 400  # per strategy below: 1,200 cases in all
FUZZ = settings(max_examples=CASES, deadline=2000, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Pristine(bytes):
    def __repr__(self):  # keep hypothesis's failure reports readable
        return f"<pristine database, {len(self)} bytes>"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A database after 30 steps, folded into one file (no -wal), bytes in memory."""
    db = tmp_path_factory.mktemp("db") / "model.db"
    write_db(db, arch.preset("gpt2", embed_dim=32, num_heads=4, num_layers=2, seq_len=16,
                             n_vocab=102, tie_weights=False),
             TrainConfig(vocab_size=100, batch_size=4, max_iters=30))
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return Pristine(db.read_bytes())


def load_outcome(path):
    """'ok' or 'error'; anything else propagates and fails the test."""
    try:
        model = load_db(path)
    except SqlgptError as e:
        assert str(e) and "\n" not in str(e)
        return "error"
    assert all(np.isfinite(t.data).all() for t in model.params)
    assert len(model.params["wte"].data) >= model.tokenizer.unk_id + 1  # every id has a row
    return "ok"


def fresh_copy(data):
    tmp = Path(tempfile.mkdtemp()) / "fuzz.db"
    tmp.write_bytes(data)
    return tmp


@FUZZ
@given(data=st.data())
def test_truncations_and_bit_flips(pristine, data):
    raw = bytearray(pristine)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    for _ in range(data.draw(st.integers(0 if len(raw) < 2 else 1, 8), label="flips")):
        if raw:
            pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
            raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = fresh_copy(bytes(raw))
    try:
        load_outcome(path)
    finally:
        shutil.rmtree(path.parent)


SQL_DAMAGE = st.sampled_from([
    "UPDATE {wt} SET data = substr(data, 1, {n}) WHERE rowid IN (SELECT rowid FROM {wt} LIMIT 1)",
    "UPDATE layers SET data = randomblob({n}) WHERE i = {k} % 16",
    "UPDATE layers SET m = NULL WHERE i = {k} % 16",
    "UPDATE layers SET crc = crc + 1 WHERE i = {k} % 16",
    "UPDATE layers SET data = 'text' WHERE i = {k} % 16",
    "DELETE FROM layers WHERE i = {k} % 16",
    "DELETE FROM head WHERE i = {k} % 32",
    "DELETE FROM embeddings WHERE type = 'wpe' AND position = {k} % 16",
    "INSERT INTO layers SELECT layer + 7, component, i, data, m, v, crc FROM layers WHERE i = 0",
    "UPDATE layers SET component = 'qq' WHERE component = 'q' AND i = {k} % 16",
    "UPDATE layers SET i = i + {k} % 3 WHERE component = 'ln1_b'",
    "DELETE FROM layers WHERE component = 'fc1_b' AND layer = {k} % 2",
    "UPDATE norms SET data = substr(data, 1, {n}) WHERE name = 'lnf_w'",
    "UPDATE norms SET name = 'lnf_x' WHERE name = 'lnf_b'",
    "UPDATE norms SET i = {v} WHERE name = 'lnf_w'",
    "DELETE FROM norms WHERE name = 'lnf_b'",
    "INSERT INTO norms SELECT name, i + 1, data, m, v, crc FROM norms",
    "UPDATE config SET value = {v} WHERE key = '{key}'",
    "DELETE FROM config WHERE key = '{key}'",
    "UPDATE vocab SET id = id + {k} WHERE id = {k} % 20",
    "DELETE FROM vocab WHERE id = {k} % 102",
    "UPDATE vocab SET word = NULL WHERE id = 1",
    "UPDATE train_state SET value = '{v}' WHERE key = 'step'",
    "DELETE FROM train_state",
    "DROP TABLE {tbl}",
    "CREATE VIEW v{k} AS SELECT 1",
    "CREATE TRIGGER t{k} AFTER INSERT ON metrics BEGIN DELETE FROM layers; END",
    "PRAGMA user_version = {k}",
    "PRAGMA application_id = {k}",
])


@FUZZ
@given(statements=st.lists(st.tuples(
    SQL_DAMAGE,
    st.integers(0, 2000),
    st.sampled_from(["0", "-1", "3", "1e12", "0.5", "'x'", "NULL", "''", "65537", "4", "2"]),
    st.sampled_from(["vocab_size", "embed_dim", "num_heads", "num_layers", "seq_len", "dropout",
                     "preset", "tokenizer", "lr", "eps", "n_vocab", "kv_heads", "norm",
                     "norm_affine", "pos", "mlp", "ffn_dim", "bias", "tie_weights",
                     "final_norm", "norm_eps"]),
    st.sampled_from(["layers", "head", "embeddings", "norms"]),
    st.sampled_from(["config", "vocab", "head", "metrics", "train_state", "norms"]),
), min_size=1, max_size=3))
def test_damaged_contents(pristine, statements):
    path = fresh_copy(pristine)
    try:
        conn = sqlite3.connect(path)
        for template, k, v, key, wt, tbl in statements:
            sql = template.format(k=k, n=k % 600, v=v, key=key, wt=wt, tbl=tbl)
            try:
                conn.execute(sql)
            except sqlite3.Error:
                pass  # the damage itself did not apply; still load what is there
        conn.commit()
        conn.close()
        load_outcome(path)
    finally:
        shutil.rmtree(path.parent)


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(["layers", "head", "embeddings", "norms"]),
                               st.integers(0, 40), st.binary(max_size=700)),
                     min_size=1, max_size=4))
def test_random_blob_contents(pristine, rows):
    """Arbitrary bytes in weight BLOBs, with a checksum that matches them:
    wrong lengths and NaN/Inf values must still be refused."""
    from sqlgpt.store import row_crc
    path = fresh_copy(pristine)
    try:
        conn = sqlite3.connect(path)
        for table, index, blob in rows:
            key = "position" if table == "embeddings" else "i"
            found = conn.execute(f"SELECT m, v FROM {table} WHERE {key} = ?", (index,)).fetchone()
            if found:
                conn.execute(f"UPDATE {table} SET data = ?, crc = ? WHERE {key} = ?",
                             (blob, row_crc(blob, *found), index))
        conn.commit()
        conn.close()
        load_outcome(path)
    finally:
        shutil.rmtree(path.parent)
