"""The database: layout, round trips, validation of what is read.

Databases here are written through store.py alone (random weights in the
shape of a preset), so these tests need no training and no model kernel."""
import shutil
import sqlite3

import numpy as np
import pytest
from helpers import load_db, randomize, standin, word_tokenizer, write_db

from sqlgpt.model import arch
from sqlgpt import store
from sqlgpt.model.arch import TensorSpec
from sqlgpt.model.config import TrainConfig
from sqlgpt.errors import SqlgptError
from sqlgpt.model.tensor import ParameterSet

# the shape of conftest's TINY model: embed 32, 4 heads, 2 layers, seq 16, 100 words
SIZES = dict(embed_dim=32, num_heads=4, num_layers=2, seq_len=16, n_vocab=102)
TRAIN = TrainConfig(vocab_size=100, batch_size=4, max_iters=30)
PRESETS = {"lua": arch.preset("lua", **SIZES),
           # tied head, biases, layernorm gains and biases, final norm
           "gpt2": arch.preset("gpt2", **SIZES),
           # grouped-query attention, swiglu, rmsnorm gains, untied head
           "llama": arch.preset("llama", kv_heads=2, **SIZES)}


@pytest.fixture(scope="module")
def stored_db(tmp_path_factory):
    """A lua database as 30 steps of training leave it: checkpoints at 0, 10,
    20 and 30, a metrics row per step (shared, read-only: copy before writing)."""
    db = tmp_path_factory.mktemp("db") / "lua.db"
    write_db(db, PRESETS["lua"], TRAIN)
    return db


@pytest.fixture(scope="module")
def gpt2_db(tmp_path_factory):
    """The same for the gpt2 preset: rows in the norms table, none in head."""
    db = tmp_path_factory.mktemp("db") / "gpt2.db"
    write_db(db, PRESETS["gpt2"], TRAIN)
    return db


def copy_db(src, tmp_path):
    dst = tmp_path / "copy.db"
    shutil.copy(src, dst)
    return dst


def test_layout_pragmas_and_original_tables(stored_db):
    conn = sqlite3.connect(stored_db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION == 6
    assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    config = dict(conn.execute("SELECT key, value FROM config"))
    for key in ("vocab_size", "embed_dim", "num_heads", "num_layers", "seq_len", "lr",
                "batch_size", "max_iters", "dropout", "beta1", "beta2", "eps",
                # the architecture, since version 2
                "preset", "n_vocab", "kv_heads", "norm", "norm_affine", "pos", "mlp", "bias",
                "tie_weights", "final_norm", "init"):
        assert key in config
    assert config["embed_dim"] == 32 and config["num_heads"] == 4 and config["max_iters"] == 30
    assert config["n_vocab"] == 102 and config["bias"] == 0 and config["norm"] == "layernorm"
    # one BLOB per matrix row, never one row per element
    C, V = 32, config["vocab_size"] + 2
    assert conn.execute("SELECT count(*) FROM embeddings WHERE type='wte'").fetchone()[0] == V
    assert conn.execute("SELECT count(*) FROM head").fetchone()[0] == C
    assert conn.execute("SELECT count(*) FROM layers WHERE layer=0 AND component='fc1'").fetchone()[0] == C
    assert conn.execute("SELECT DISTINCT length(data) FROM layers WHERE component='fc1'").fetchall() == [(4 * C * 4,)]
    assert conn.execute("SELECT count(*) FROM norms").fetchone()[0] == 0  # lua has no gains
    assert conn.execute("SELECT count(*) FROM vocab").fetchone()[0] == V
    assert [s for s, in conn.execute("SELECT step FROM checkpoints")] == [0, 10, 20, 30]
    assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 30


def test_every_table_in_schema_sql_has_a_comment():
    """schema.sql documents every table: a comment line right above each CREATE TABLE."""
    lines = store.schema_sql().splitlines()
    creates = [i for i, line in enumerate(lines) if line.startswith("CREATE TABLE")]
    assert len(creates) == len(store.REQUIRED_TABLES)
    assert all(lines[i - 1].startswith("--") for i in creates)


def test_blob_rows_are_little_endian_float32_of_the_weights(stored_db):
    model = load_db(stored_db)
    conn = sqlite3.connect(stored_db)
    blob, = conn.execute("SELECT data FROM layers WHERE layer=1 AND component='q' AND i=3").fetchone()
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), model.params["layers.1.q"].data[3])


def test_vectors_are_one_row_under_their_documented_names(gpt2_db):
    model = load_db(gpt2_db)
    conn = sqlite3.connect(gpt2_db)
    assert conn.execute("SELECT layer, i, length(data) FROM layers WHERE component='ln1_b' "
                        "ORDER BY layer").fetchall() == [(0, 0, 4 * 32), (1, 0, 4 * 32)]
    assert conn.execute("SELECT length(data) FROM layers WHERE layer=0 AND component='fc1_b'"
                        ).fetchall() == [(4 * 128,)]
    assert conn.execute("SELECT name, i FROM norms ORDER BY name").fetchall() == \
        [("lnf_b", 0), ("lnf_w", 0)]
    blob, = conn.execute("SELECT data FROM norms WHERE name='lnf_w'").fetchone()
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), model.params["lnf_w"].data)
    assert conn.execute("SELECT count(*) FROM head").fetchone()[0] == 0  # tied: wte is the head


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (9, 7), (3, 16), (4, 20), (5, 31), (130, 64),
                                   (700, 33), (2, 1001), (1,), (17,), (1001,)])
def test_kernel_row_checksums_are_zlibs(rng, shape):
    """The kernel's CRC-32 of every row (data || m || v) against zlib's; a
    vector is one row."""
    t = ParameterSet([TensorSpec("w", shape, ("zeros", 0), True)])["w"]
    for buf in (t.data, t.m, t.v):
        buf[...] = rng.standard_normal(shape)
    rows = [buf.reshape(t.spec.rows, t.spec.cols) for buf in (t.data, t.m, t.v)]
    expected = [store.row_crc(*(r[i].tobytes() for r in rows)) for i in range(t.spec.rows)]
    assert store.row_crcs(t) == expected


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_round_trips_bit_exact(tmp_path, rng, preset):
    model = randomize(standin(PRESETS[preset]), rng)
    conn, lock = store.create_database(tmp_path / "m.db", model, TRAIN, word_tokenizer(100),
                                       {"step": 0, "elapsed_s": 0.0})
    conn.close()
    lock.release()
    loaded = load_db(tmp_path / "m.db")
    assert loaded.arch == PRESETS[preset] and loaded.train_cfg == TRAIN
    assert [t.name for t in loaded.params] == [t.name for t in model.params]
    for t in model.params:
        for buf in ("data", "m", "v"):
            np.testing.assert_array_equal(getattr(loaded.params[t.name], buf), getattr(t, buf))
    for buf in ("data", "m", "v"):  # the gaps between tensors too
        assert loaded.params.arenas[buf].tobytes() == model.params.arenas[buf].tobytes()


def test_save_load_round_trip_is_bit_exact(stored_db, tmp_path):
    first = load_db(stored_db)
    db = copy_db(stored_db, tmp_path)
    conn = store.open_database(db, readonly=False)
    first.state["step"] += 1
    store.save_checkpoint(conn, first, first.train_cfg, first.state, 1.0, None)
    conn.close()
    second = load_db(db)
    for buf in ("data", "m", "v"):
        assert first.params.arenas[buf].tobytes() == second.params.arenas[buf].tobytes()
    assert np.abs(first.params.arenas["m"]).sum() > 0  # moments were really stored
    assert second.step == 31 and second.train_cfg == first.train_cfg


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
    ("UPDATE config SET value = 'batchnorm' WHERE key = 'norm'", "norm must be one of"),
    ("UPDATE config SET value = 3 WHERE key = 'kv_heads'", "must divide"),
    ("UPDATE config SET value = 1 WHERE key = 'tie_weights'", "unknown parameter.*head"),
    ("UPDATE config SET value = 101 WHERE key = 'n_vocab'", "102 token ids but the model has n_vocab 101"),
    ("DELETE FROM vocab WHERE id = 3", "token ids are not exactly"),
    ("PRAGMA user_version = 99", "newer"),
    ("PRAGMA user_version = 0", "damaged: schema version 0"),
    ("PRAGMA application_id = 7", "not a sqlgpt database"),
    ("DROP TABLE metrics", "missing table"),
    ("DROP TABLE norms", "missing table"),
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
    ("INSERT INTO layers SELECT 7, component, i, data, m, v, crc FROM layers WHERE layer = 0",
     r"unknown parameter\(s\): layers \(layer=7, component='fc1'\)"),
    ("INSERT INTO norms SELECT name, i, data, m, v, crc FROM layers, "
     "(SELECT 'lnf_w' AS name) WHERE layer = 0 AND component = 'q' AND i = 0",
     "unknown parameter.*norms \\(name='lnf_w'\\)"),
])
def test_damaged_databases_are_refused(stored_db, tmp_path, sql, message):
    db = copy_db(stored_db, tmp_path)
    damage(db, sql)
    with pytest.raises(SqlgptError, match=message):
        load_db(db)


@pytest.mark.parametrize("sql,message", [
    ("UPDATE norms SET data = substr(data, 1, 10) WHERE name = 'lnf_w'", "lnf_w are damaged"),
    ("DELETE FROM norms WHERE name = 'lnf_b'", r"lnf_b are damaged: expected rows 0\.\.0, found 0"),
    ("UPDATE norms SET data = zeroblob(length(data)) WHERE name = 'lnf_b'",
     "lnf_b are damaged: row 0 fails its checksum"),
    ("UPDATE norms SET i = 0.5 WHERE name = 'lnf_w'", "lnf_w .*expected rows"),
    ("UPDATE norms SET i = 1 WHERE name = 'lnf_w'", "lnf_w .*expected rows"),
    ("INSERT INTO norms SELECT name, 1, data, m, v, crc FROM norms WHERE name = 'lnf_w'",
     r"lnf_w .*expected rows 0\.\.0, found 2"),
    ("UPDATE norms SET name = 'lnf_x' WHERE name = 'lnf_b'",
     r"unknown parameter\(s\): norms \(name='lnf_x'\)"),
    ("UPDATE norms SET m = x'00' WHERE name = 'lnf_w'", "lnf_w .*a row is not 32 float32 values"),
    ("UPDATE layers SET v = x'' WHERE layer = 1 AND component = 'fc1_b'",
     "layers.1.fc1_b .*a row is not 128 float32 values"),
    ("DELETE FROM layers WHERE layer = 0 AND component = 'ln2_w'", "layers.0.ln2_w are damaged"),
    ("UPDATE layers SET data = zeroblob(length(data)) WHERE layer = 1 AND component = 'q_b'",
     "layers.1.q_b .*checksum"),
    # a tied head has no rows of its own
    ("INSERT INTO head SELECT 0, data, m, v, crc FROM layers WHERE component = 'q' AND layer = 0 "
     "AND i = 0", r"unknown parameter\(s\): head$"),
    ("UPDATE config SET value = 0 WHERE key = 'final_norm'", "unknown parameter.*lnf_b.*lnf_w"),
    ("UPDATE config SET value = 0 WHERE key = 'bias'", "unknown parameter.*fc1_b"),
    # claiming version 1: the tensors view of version 3 is not one version 1 had
    ("PRAGMA user_version = 1", r"views or triggers sqlgpt did not create \(tensors\)"),
])
def test_damaged_norms_and_biases_are_refused(gpt2_db, tmp_path, sql, message):
    db = copy_db(gpt2_db, tmp_path)
    damage(db, sql)
    with pytest.raises(SqlgptError, match=message):
        load_db(db)


def test_a_repeated_row_index_is_refused(stored_db, tmp_path):
    """A layers table made without its primary key, holding row 0 twice and no
    row 1: count, range and type of the indices alone would pass it."""
    db = copy_db(stored_db, tmp_path)
    damage(db, "CREATE TABLE loose AS SELECT * FROM layers")
    damage(db, "DROP TABLE layers")
    damage(db, "ALTER TABLE loose RENAME TO layers")
    damage(db, "DELETE FROM layers WHERE layer = 0 AND component = 'q' AND i = 1")
    damage(db, "INSERT INTO layers SELECT * FROM layers WHERE layer = 0 AND component = 'q' "
               "AND i = 0")  # a whole copy, checksum included
    with pytest.raises(SqlgptError, match="expected rows"):
        load_db(db)


def rewrite_row(db, table, where, column, value):
    """Set every value of one row's `column` to value, with a valid checksum."""
    conn = sqlite3.connect(db)
    row = conn.execute(f"SELECT data, m, v FROM {table} WHERE {where}").fetchone()
    blobs = dict(zip("dmv", row))
    blobs[column[0]] = np.full(len(blobs["d"]) // 4, value, "<f4").tobytes()
    conn.execute(f"UPDATE {table} SET {column} = ?, crc = ? WHERE {where}",
                 (blobs[column[0]], store.row_crc(blobs["d"], blobs["m"], blobs["v"])))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("column, value, message", [
    ("data", np.nan, "head contain NaN or Inf"), ("m", np.inf, "head contain NaN or Inf"),
    ("v", -np.inf, "head contain NaN or Inf"), ("v", -1.0, "head .*negative Adam"),
])
def test_bad_values_are_refused_even_with_a_valid_checksum(stored_db, tmp_path, column,
                                                          value, message):
    db = copy_db(stored_db, tmp_path)
    rewrite_row(db, "head", "i = 0", column, value)
    with pytest.raises(SqlgptError, match=message):
        load_db(db)


@pytest.mark.parametrize("column, value, message", [
    ("data", np.nan, "lnf_w contain NaN or Inf"), ("v", -1.0, "lnf_w .*negative Adam")])
def test_bad_norm_values_are_refused_even_with_a_valid_checksum(gpt2_db, tmp_path, column,
                                                               value, message):
    db = copy_db(gpt2_db, tmp_path)
    rewrite_row(db, "norms", "name = 'lnf_w'", column, value)
    with pytest.raises(SqlgptError, match=message):
        load_db(db)


def test_huge_finite_values_load(stored_db, tmp_path):
    """Squares of these overflow float32: the quick finiteness test fails and
    the exact search must find nothing wrong."""
    db = copy_db(stored_db, tmp_path)
    rewrite_row(db, "head", "i = 0", "data", 3e38)
    assert load_db(db).params["head"].data[0, 0] == np.float32(3e38)


@pytest.mark.parametrize("db, table, where, message", [
    ("stored_db", "layers", "layer=1 AND component='fc2' AND i=7",
     "layers.1.fc2 .*row 7 fails its checksum"),
    ("gpt2_db", "norms", "name='lnf_w' AND i=0", "lnf_w .*row 0 fails its checksum"),
    ("gpt2_db", "layers", "layer=0 AND component='ln1_b' AND i=0",
     "layers.0.ln1_b .*row 0 fails its checksum"),
])
def test_a_flipped_bit_inside_a_blob_is_caught(request, tmp_path, db, table, where, message):
    """integrity_check cannot see this: the b-tree is fine, one float is wrong."""
    db = copy_db(request.getfixturevalue(db), tmp_path)
    conn = sqlite3.connect(db)
    data, = conn.execute(f"SELECT data FROM {table} WHERE {where}").fetchone()
    flipped = bytearray(data)
    flipped[13] ^= 0x04
    conn.execute(f"UPDATE {table} SET data = ? WHERE {where}", (bytes(flipped),))
    conn.commit()
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with pytest.raises(SqlgptError, match=message):
        load_db(db)


@pytest.mark.parametrize("content", [b"", b"hello, not a database", b"SQLite format 3\x00" + b"\xff" * 200])
def test_files_that_are_not_databases_are_refused(tmp_path, content):
    path = tmp_path / "x.db"
    path.write_bytes(content)
    with pytest.raises(SqlgptError):
        load_db(path)
    assert path.read_bytes() == content


def test_another_apps_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE config (key TEXT, value)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SqlgptError, match="not a sqlgpt database"):
        load_db(path)
    assert path.read_bytes() == before


def open_for_writing(db):
    """A writer's connection and the model, train settings and state it resumes from."""
    conn = store.open_database(db, readonly=False)
    arch_cfg, train_cfg = store.read_config(conn)
    model = standin(arch_cfg)
    store.read_weights(conn, model)
    return conn, model, train_cfg, store.read_train_state(conn)


def test_readers_see_a_consistent_checkpoint_while_a_writer_commits(stored_db, tmp_path):
    db = copy_db(stored_db, tmp_path)
    writer, model, train_cfg, state = open_for_writing(db)
    reader = store.open_database(db)
    reader.execute("BEGIN")
    before = reader.execute("SELECT data FROM head WHERE i = 0").fetchone()[0]
    model.params["head"].data[...] += 1.0
    state["step"] += 1
    # commits while the reader is open
    store.save_checkpoint(writer, model, train_cfg, state, 1.0, None)
    assert reader.execute("SELECT data FROM head WHERE i = 0").fetchone()[0] == before
    reader.execute("COMMIT")
    after = reader.execute("SELECT data FROM head WHERE i = 0").fetchone()[0]
    np.testing.assert_array_equal(np.frombuffer(after, "<f4"), np.frombuffer(before, "<f4") + 1.0)
    reader.close()
    writer.close()


def test_a_failed_checkpoint_leaves_the_previous_one(stored_db, tmp_path):
    db = copy_db(stored_db, tmp_path)
    conn, model, train_cfg, state = open_for_writing(db)
    good = load_db(db)
    model.params["head"].data[...] = 0.0
    state["step"] += 1
    state["bad"] = object()  # json.dumps fails mid-transaction, after the weights were written
    with pytest.raises(TypeError):
        store.save_checkpoint(conn, model, train_cfg, state, 1.0, None)
    assert not conn.in_transaction
    conn.close()
    reloaded = load_db(db)
    np.testing.assert_array_equal(reloaded.params["head"].data, good.params["head"].data)
    assert reloaded.step == 30


@pytest.mark.parametrize("db", ["stored_db", "gpt2_db"])
def test_checkpoints_find_rows_whose_rowids_moved(request, tmp_path, db):
    """Rows are rewritten by rowid, read in the same transaction: a row that
    was deleted and inserted again (a new rowid, out of key order) still gets
    its own values."""
    db = copy_db(request.getfixturevalue(db), tmp_path)
    with sqlite3.connect(db) as conn:
        for table, where in (("layers", "layer = 0 AND i < 3"), ("norms", "name = 'lnf_b'")):
            conn.execute(f"CREATE TEMP TABLE moved AS SELECT * FROM {table} WHERE {where}")
            conn.execute(f"DELETE FROM {table} WHERE {where}")
            conn.execute(f"INSERT INTO {table} SELECT * FROM moved ORDER BY i DESC")
            conn.execute("DROP TABLE moved")
    conn, model, train_cfg, state = open_for_writing(db)
    for t in model.params:
        t.data[...] = np.arange(t.data.size, dtype=np.float32).reshape(t.shape) + len(t.name)
    state["step"] += 1
    store.save_checkpoint(conn, model, train_cfg, state, 1.0, None)
    conn.close()
    reloaded = load_db(db)
    for t in model.params:
        np.testing.assert_array_equal(reloaded.params[t.name].data, t.data)


@pytest.mark.parametrize("table, sql", [
    ("layers", "DELETE FROM layers WHERE layer = 1 AND component = 'fc2' AND i = 5"),
    ("layers",
     "UPDATE layers SET component = 'zz' WHERE layer = 1 AND component = 'fc2' AND i = 5"),
    ("norms", "DELETE FROM norms WHERE name = 'lnf_w'"),
    ("norms", "UPDATE norms SET name = 'lnf_x' WHERE name = 'lnf_w'")])
def test_a_checkpoint_into_a_table_without_the_models_rows_is_refused(gpt2_db, tmp_path, table,
                                                                      sql):
    db = copy_db(gpt2_db, tmp_path)
    conn, model, train_cfg, state = open_for_writing(db)
    conn.execute(sql)
    row = "SELECT data FROM embeddings WHERE type = 'wte' AND position = 1"
    before = conn.execute(row).fetchone()[0]
    model.params["wte"].data[...] += 1.0  # embeddings are written before layers: rolled back
    state["step"] += 1
    with pytest.raises(SqlgptError, match=f"{table} table does not have the model's rows"):
        store.save_checkpoint(conn, model, train_cfg, state, 1.0, None)
    assert conn.execute(row).fetchone()[0] == before
    assert conn.execute("SELECT max(step) FROM checkpoints").fetchone()[0] == state["step"] - 1
    conn.close()
