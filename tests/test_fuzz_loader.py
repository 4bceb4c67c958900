"""Hostile databases: the loader is fuzzed with random truncations, bit
flips, wrong BLOB lengths, missing rows, bad config values and extra
triggers/views. Every case must end in a clean SqlgptError or a successful
load: never another exception, a crash or a hang."""
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sqlgpt
from sqlgpt.errors import SqlgptError

CASES = 400  # per strategy below: 1,200 cases in all
FUZZ = settings(max_examples=CASES, deadline=2000, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Pristine(bytes):
    def __repr__(self):  # keep hypothesis's failure reports readable
        return f"<pristine database, {len(self)} bytes>"


@pytest.fixture(scope="module")
def pristine(trained_db):
    """The trained database folded into one file (no -wal), bytes in memory."""
    conn = sqlite3.connect(trained_db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return Pristine(Path(trained_db).read_bytes())


def load_outcome(path):
    """'ok' or 'error'; anything else propagates and fails the test."""
    try:
        model = sqlgpt.load(path)
    except SqlgptError as e:
        assert str(e) and "\n" not in str(e)
        return "error"
    assert all(np.isfinite(w).all() for w in model.state_dict().values())
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
                     "preset", "tokenizer", "lr", "eps"]),
    st.sampled_from(["layers", "head", "embeddings"]),
    st.sampled_from(["config", "vocab", "head", "metrics", "train_state"]),
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
@given(rows=st.lists(st.tuples(st.sampled_from(["layers", "head", "embeddings"]),
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
