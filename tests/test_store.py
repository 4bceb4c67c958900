"""The database: layout, round trips, validation of what is read."""
import shutil
import sqlite3

import numpy as np
import pytest

import sqlgpt
from sqlgpt import store
from sqlgpt.errors import SqlgptError
from sqlgpt.model import GPT


def copy_db(src, tmp_path):
    dst = tmp_path / "copy.db"
    shutil.copy(src, dst)
    return dst


def test_layout_pragmas_and_original_tables(trained_db):
    conn = sqlite3.connect(trained_db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    config = dict(conn.execute("SELECT key, value FROM config"))
    for key in ("vocab_size", "embed_dim", "num_heads", "num_layers", "seq_len", "lr",
                "batch_size", "max_iters", "dropout", "beta1", "beta2", "eps"):
        assert key in config
    assert config["embed_dim"] == 32 and config["num_heads"] == 4 and config["max_iters"] == 30
    # one BLOB per matrix row, never one row per element
    C, V = 32, config["vocab_size"] + 2
    assert conn.execute("SELECT count(*) FROM embeddings WHERE type='wte'").fetchone()[0] == V
    assert conn.execute("SELECT count(*) FROM head").fetchone()[0] == C
    assert conn.execute("SELECT count(*) FROM layers WHERE layer=0 AND component='fc1'").fetchone()[0] == C
    assert conn.execute("SELECT DISTINCT length(data) FROM layers WHERE component='fc1'").fetchall() == [(4 * C * 4,)]
    assert conn.execute("SELECT count(*) FROM vocab").fetchone()[0] == V
    assert [s for s, in conn.execute("SELECT step FROM checkpoints")] == [0, 10, 20, 30]
    assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 30


def test_blob_rows_are_little_endian_float32_of_the_weights(trained_db):
    model = sqlgpt.load(trained_db)
    conn = sqlite3.connect(trained_db)
    blob, = conn.execute("SELECT data FROM layers WHERE layer=1 AND component='q' AND i=3").fetchone()
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), model.state_dict()["layers.1.q"][3])


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (9, 7), (3, 16), (4, 20), (5, 31), (130, 64),
                                   (700, 33), (2, 1001)])
def test_kernel_row_checksums_are_zlibs(rng, shape):
    """The kernel's CRC-32 of every row (data || m || v) against zlib's."""
    from sqlgpt.tensor import ParameterSet
    t = ParameterSet([("w", shape)])["w"]
    for buf in (t.data, t.m, t.v):
        buf[...] = rng.standard_normal(shape)
    expected = [store.row_crc(*(buf[i].tobytes() for buf in (t.data, t.m, t.v)))
                for i in range(shape[0])]
    assert store.row_crcs(t) == expected


def test_save_load_round_trip_is_bit_exact(trained_db, tmp_path):
    conn = store.open_database(trained_db)
    cfg = store.read_config(conn)
    first = GPT(cfg)
    store.read_weights(conn, first)
    state = store.read_train_state(conn)
    conn.close()
    db = copy_db(trained_db, tmp_path)
    conn = store.open_database(db, readonly=False)
    state["step"] += 1
    store.save_checkpoint(conn, first, state, 1.0, None)
    second = GPT(store.read_config(conn))
    store.read_weights(conn, second)
    conn.close()
    for buf in ("data", "m", "v"):
        assert first.params.arenas[buf].tobytes() == second.params.arenas[buf].tobytes()
    assert np.abs(first.params.arenas["m"]).sum() > 0  # moments were really stored


def damage(db, sql):
    conn = sqlite3.connect(db)
    conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("sql,message", [
    ("UPDATE layers SET data = substr(data, 1, 10) WHERE layer=0 AND i=0", "damaged"),
    ("DELETE FROM head WHERE i = 5", "damaged"),
    ("UPDATE config SET value = 3 WHERE key = 'num_heads'", "must divide"),
    ("UPDATE config SET value = 'many' WHERE key = 'num_layers'", "bad value"),
    ("DELETE FROM vocab WHERE id = 3", "vocab"),
    ("PRAGMA user_version = 99", "newer"),
    ("PRAGMA application_id = 7", "not a sqlgpt database"),
    ("DROP TABLE metrics", "missing table"),
    ("UPDATE head SET data = zeroblob(length(data)) WHERE i = 0", "checksum"),
    # rows 0..n-1 by count, min and max, but one index is not an integer
    ("UPDATE layers SET i = 2.5 WHERE layer = 0 AND component = 'q' AND i = 2", "expected rows"),
    ("UPDATE embeddings SET position = 'x' WHERE type = 'wpe' AND position = 3", "expected rows"),
    # a row one value short and the next one long: the total length is right
    ("UPDATE layers SET data = CASE i WHEN 0 THEN substr(data, 1, length(data) - 4) "
     "ELSE CAST(data || x'00000000' AS BLOB) END WHERE layer = 0 AND component = 'k' AND i < 2",
     "a row is not 32 float32 values"),
    ("UPDATE layers SET m = 7 WHERE layer = 1 AND component = 'v' AND i = 0",
     "a row is not 32 float32 values"),
])
def test_damaged_databases_are_refused(trained_db, tmp_path, sql, message):
    db = copy_db(trained_db, tmp_path)
    damage(db, sql)
    with pytest.raises(SqlgptError, match=message):
        sqlgpt.load(db)


def test_a_repeated_row_index_is_refused(trained_db, tmp_path):
    """A layers table made without its primary key, holding row 0 twice and no
    row 1: count, range and type of the indices alone would pass it."""
    db = copy_db(trained_db, tmp_path)
    damage(db, "CREATE TABLE loose AS SELECT * FROM layers")
    damage(db, "DROP TABLE layers")
    damage(db, "ALTER TABLE loose RENAME TO layers")
    damage(db, "DELETE FROM layers WHERE layer = 0 AND component = 'q' AND i = 1")
    damage(db, "INSERT INTO layers SELECT * FROM layers WHERE layer = 0 AND component = 'q' "
               "AND i = 0")  # a whole copy, checksum included
    with pytest.raises(SqlgptError, match="expected rows"):
        sqlgpt.load(db)


def rewrite_head_row(db, column, value):
    """Set every value of head row 0's `column` to value, with a valid checksum."""
    conn = sqlite3.connect(db)
    blobs = dict(zip("dmv", conn.execute("SELECT data, m, v FROM head WHERE i = 0").fetchone()))
    blobs[column[0]] = np.full(len(blobs["d"]) // 4, value, "<f4").tobytes()
    conn.execute(f"UPDATE head SET {column} = ?, crc = ? WHERE i = 0",
                 (blobs[column[0]], store.row_crc(blobs["d"], blobs["m"], blobs["v"])))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("column, value, message", [
    ("data", np.nan, "head contain NaN or Inf"), ("m", np.inf, "head contain NaN or Inf"),
    ("v", -np.inf, "head contain NaN or Inf"), ("v", -1.0, "head .*negative Adam"),
])
def test_bad_values_are_refused_even_with_a_valid_checksum(trained_db, tmp_path, column,
                                                          value, message):
    db = copy_db(trained_db, tmp_path)
    rewrite_head_row(db, column, value)
    with pytest.raises(SqlgptError, match=message):
        sqlgpt.load(db)


def test_huge_finite_values_load(trained_db, tmp_path):
    """Squares of these overflow float32: the quick finiteness test fails and
    the exact search must find nothing wrong."""
    db = copy_db(trained_db, tmp_path)
    rewrite_head_row(db, "data", 3e38)
    assert sqlgpt.load(db).state_dict()["head"][0, 0] == np.float32(3e38)


def test_a_flipped_bit_inside_a_blob_is_caught(trained_db, tmp_path):
    """integrity_check cannot see this: the b-tree is fine, one float is wrong."""
    db = copy_db(trained_db, tmp_path)
    conn = sqlite3.connect(db)
    data, = conn.execute("SELECT data FROM layers WHERE layer=1 AND component='fc2' AND i=7").fetchone()
    flipped = bytearray(data)
    flipped[13] ^= 0x04
    conn.execute("UPDATE layers SET data = ? WHERE layer=1 AND component='fc2' AND i=7", (bytes(flipped),))
    conn.commit()
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with pytest.raises(SqlgptError, match="layers.1.fc2 .*row 7 fails its checksum"):
        sqlgpt.load(db)


@pytest.mark.parametrize("content", [b"", b"hello, not a database", b"SQLite format 3\x00" + b"\xff" * 200])
def test_files_that_are_not_databases_are_refused(tmp_path, content):
    path = tmp_path / "x.db"
    path.write_bytes(content)
    with pytest.raises(SqlgptError):
        sqlgpt.load(path)
    assert path.read_bytes() == content


def test_another_apps_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE config (key TEXT, value)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SqlgptError, match="not a sqlgpt database"):
        sqlgpt.load(path)
    assert path.read_bytes() == before


def test_readers_see_a_consistent_checkpoint_while_a_writer_commits(trained_db, tmp_path):
    db = copy_db(trained_db, tmp_path)
    writer = store.open_database(db, readonly=False)
    cfg = store.read_config(writer)
    model = GPT(cfg)
    store.read_weights(writer, model)
    state = store.read_train_state(writer)
    reader = store.open_database(db)
    reader.execute("BEGIN")
    before = reader.execute("SELECT data FROM head WHERE i = 0").fetchone()[0]
    model.params["head"].data[...] += 1.0
    state["step"] += 1
    store.save_checkpoint(writer, model, state, 1.0, None)   # commits while the reader is open
    assert reader.execute("SELECT data FROM head WHERE i = 0").fetchone()[0] == before
    reader.execute("COMMIT")
    after = reader.execute("SELECT data FROM head WHERE i = 0").fetchone()[0]
    np.testing.assert_array_equal(np.frombuffer(after, "<f4"), np.frombuffer(before, "<f4") + 1.0)
    reader.close()
    writer.close()


def test_a_failed_checkpoint_leaves_the_previous_one(trained_db, tmp_path):
    db = copy_db(trained_db, tmp_path)
    conn = store.open_database(db, readonly=False)
    model = GPT(store.read_config(conn))
    store.read_weights(conn, model)
    state = store.read_train_state(conn)
    good = sqlgpt.load(db).state_dict()
    model.params["head"].data[...] = 0.0
    state["step"] += 1
    state["bad"] = object()  # json.dumps fails mid-transaction, after the weights were written
    with pytest.raises(TypeError):
        store.save_checkpoint(conn, model, state, 1.0, None)
    assert not conn.in_transaction
    conn.close()
    reloaded = sqlgpt.load(db)
    np.testing.assert_array_equal(reloaded.state_dict()["head"], good["head"])
    assert reloaded.step == 30


def open_for_writing(db):
    conn = store.open_database(db, readonly=False)
    model = GPT(store.read_config(conn))
    store.read_weights(conn, model)
    return conn, model, store.read_train_state(conn)


def test_checkpoints_find_rows_whose_rowids_moved(trained_db, tmp_path):
    """Rows are rewritten by rowid, read in the same transaction: a row that
    was deleted and inserted again (a new rowid, out of key order) still gets
    its own values."""
    db = copy_db(trained_db, tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TEMP TABLE moved AS SELECT * FROM layers WHERE layer = 0 AND i < 3")
        conn.execute("DELETE FROM layers WHERE layer = 0 AND i < 3")
        conn.execute("INSERT INTO layers (layer, component, i, data, m, v, crc) "
                     "SELECT layer, component, i, data, m, v, crc FROM moved ORDER BY i DESC")
    conn, model, state = open_for_writing(db)
    for t in model.params:
        t.data[...] = np.arange(t.data.size, dtype=np.float32).reshape(t.shape) + len(t.name)
    state["step"] += 1
    store.save_checkpoint(conn, model, state, 1.0, None)
    conn.close()
    reloaded = sqlgpt.load(db).state_dict()
    for t in model.params:
        np.testing.assert_array_equal(reloaded[t.name], t.data)


@pytest.mark.parametrize("sql", [
    "DELETE FROM layers WHERE layer = 1 AND component = 'fc2' AND i = 5",
    "UPDATE layers SET component = 'zz' WHERE layer = 1 AND component = 'fc2' AND i = 5"])
def test_a_checkpoint_into_a_table_without_the_models_rows_is_refused(trained_db, tmp_path, sql):
    db = copy_db(trained_db, tmp_path)
    conn, model, state = open_for_writing(db)
    conn.execute(sql)
    row = "SELECT data FROM embeddings WHERE type = 'wte' AND position = 1"
    before = conn.execute(row).fetchone()[0]
    model.params["wte"].data[...] += 1.0  # embeddings are written before layers: rolled back
    state["step"] += 1
    with pytest.raises(SqlgptError, match="layers table does not have the model's rows"):
        store.save_checkpoint(conn, model, state, 1.0, None)
    assert conn.execute(row).fetchone()[0] == before
    assert conn.execute("SELECT max(step) FROM checkpoints").fetchone()[0] == state["step"] - 1
    conn.close()
