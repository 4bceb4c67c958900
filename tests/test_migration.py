"""Schema migrations, on a database the previous release wrote.

tests/data/v1_model.db.gz is a schema-1 database made by c523d19 (lua
preset, embed 16, 2 heads, 1 layer, seq 8, 20 steps on the first 20,000
characters of examples/tinyshakespeare.txt); v1_model_logits.npz holds its
logits for one prompt (keys ids, logits). A read-only open reads it as it is;
opening it for writing migrates it to the current version, one numbered
step per transaction."""
import gzip
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import load_db, query, rel_err, standin, weights_bytes, write_db

from sqlgpt.model import arch
from sqlgpt import store
from sqlgpt.model.config import TrainConfig
from sqlgpt.errors import SqlgptError

DATA = Path(__file__).resolve().parent / "data"
V1_ARCH = arch.preset("lua", n_vocab=32, embed_dim=16, num_heads=2, num_layers=1, seq_len=8)


def unpacked(fixture, path):
    """A fresh copy of a committed, gzipped database at path."""
    with gzip.open(DATA / fixture) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture
def v1_db(tmp_path):
    """A fresh copy of the committed version-1 database."""
    return unpacked("v1_model.db.gz", tmp_path / "v1.db")


def execute(db, sql):
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def version(db):
    return query(db, "PRAGMA user_version")[0][0]


def config_of(db):
    return dict(query(db, "SELECT key, value FROM config"))


def non_weight_tables(db):
    """Everything but config and the weights, row for row."""
    return {t: query(db, f"SELECT * FROM {t} ORDER BY 1")
            for t in ("vocab", "train_state", "checkpoints", "metrics")}


def table_layout(db):
    """Each table's and index's definition, comments and spacing aside."""
    rows = query(db, "SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    def normal(sql):
        text = " ".join(re.sub(r"--[^\n]*", "", sql or "").split())
        return re.sub(r" ?([(),]) ?", r"\1", text)  # ALTER TABLE's spacing, schema.sql's
    return {(kind, name): normal(sql) for kind, name, sql in rows}


def test_the_fixture_is_version_1(v1_db):
    assert version(v1_db) == 1
    assert query(v1_db, "SELECT name FROM sqlite_master WHERE name = 'norms'") == []
    assert "n_vocab" not in config_of(v1_db)


def test_a_read_only_open_reads_version_1_and_leaves_it_untouched(v1_db):
    before = v1_db.read_bytes()
    model = load_db(v1_db)
    assert model.arch == V1_ARCH
    assert model.train_cfg.vocab_size == 30 and model.train_cfg.max_iters == 20
    assert model.tokenizer.vocab_size == 30
    assert model.step == 20
    assert np.abs(model.params.arenas["m"]).sum() > 0
    assert store.integrity_check(v1_db) == []
    assert len(weights_bytes(v1_db)) == 32 + 8 + (5 * 16 + 64) + 16  # wte, wpe, layer 0, head
    assert v1_db.read_bytes() == before
    assert sorted(p.name for p in v1_db.parent.iterdir()) == ["v1.db"]  # no -wal, -shm, -journal


@pytest.mark.parametrize("journal", ["delete", "wal"])  # the fixture's mode, and a trainer's
def test_opening_for_writing_migrates_to_the_current_version(v1_db, journal):
    execute(v1_db, f"PRAGMA journal_mode = {journal}")
    config, weights, others = config_of(v1_db), weights_bytes(v1_db), non_weight_tables(v1_db)
    words = query(v1_db, "SELECT id, word FROM vocab ORDER BY id")
    store.open_database(v1_db, readonly=False).close()
    # the vocabulary by id, each word with its bytes, the specials without
    # (and, since version 3, no count: the corpus was not counted then)
    others["vocab"] = [(i, w, None if w in ("<pad>", "<unk>") else w.encode(), None)
                       for i, w in words]
    others["metrics"] = [(*row, None) for row in others["metrics"]]  # no gradient norms then
    assert query(v1_db, "SELECT key, value FROM tokenizer") == [("kind", "word")]
    assert version(v1_db) == store.SCHEMA_VERSION == 6
    assert query(v1_db, "SELECT count(*) FROM norms") == [(0,)]
    migrated = config_of(v1_db)
    assert {k: migrated[k] for k in config} == config  # no key changed
    assert {k: migrated[k] for k in V1_ARCH.to_dict()} == V1_ARCH.to_dict()  # sqlite: bools 0/1
    assert weights_bytes(v1_db) == weights  # byte for byte, checksums included
    assert non_weight_tables(v1_db) == others
    assert store.integrity_check(v1_db) == []
    after = v1_db.read_bytes()
    store.open_database(v1_db, readonly=False).close()  # a second open does nothing more
    assert v1_db.read_bytes() == after
    loaded = load_db(v1_db)
    assert loaded.arch == V1_ARCH and loaded.step == 20


def test_a_migrated_file_has_the_tables_of_a_new_one(v1_db, tmp_path):
    store.open_database(v1_db, readonly=False).close()
    new = tmp_path / "new.db"
    write_db(new, V1_ARCH, TrainConfig(vocab_size=30), save_at=())
    assert table_layout(v1_db) == table_layout(new)
    assert set(config_of(v1_db)) == set(config_of(new))


def fail_after(step, failure):
    """A migration step that does all its work, then fails before it commits."""
    def failing(conn):
        step(conn)
        if failure == "crash":
            raise RuntimeError("power cut")
        conn.execute("INSERT INTO no_such_table VALUES (1)")  # an SQLite error
    return failing


@pytest.mark.parametrize("failure, error, message", [
    ("crash", RuntimeError, "power cut"),
    ("sqlite", SqlgptError, r"cannot migrate .*v1.db from schema version 1 to 2 \(the file is "
                            r"unchanged\): no such table: no_such_table")])
def test_a_failed_migration_leaves_a_valid_version_1(v1_db, monkeypatch, failure, error,
                                                     message):
    config, weights, others = config_of(v1_db), weights_bytes(v1_db), non_weight_tables(v1_db)
    monkeypatch.setitem(store.MIGRATIONS, 1, fail_after(store.MIGRATIONS[1], failure))
    with pytest.raises(error, match=message):
        store.open_database(v1_db, readonly=False)
    assert version(v1_db) == 1
    assert query(v1_db, "SELECT name FROM sqlite_master WHERE name = 'norms'") == []
    assert config_of(v1_db) == config
    assert weights_bytes(v1_db) == weights and non_weight_tables(v1_db) == others
    assert store.integrity_check(v1_db) == []
    assert load_db(v1_db).arch == V1_ARCH
    monkeypatch.undo()
    store.open_database(v1_db, readonly=False).close()  # and it migrates once it can
    assert version(v1_db) == store.SCHEMA_VERSION


def test_a_version_1_file_with_a_bad_config_is_not_migrated(v1_db):
    execute(v1_db, "UPDATE config SET value = 3 WHERE key = 'num_heads'")
    with pytest.raises(SqlgptError, match="cannot migrate .* 1 to 2 .*must divide"):
        store.open_database(v1_db, readonly=False)
    assert version(v1_db) == 1


def test_save_checkpoint_after_migration(v1_db):
    conn = store.open_database(v1_db, readonly=False)
    arch_cfg, train_cfg = store.read_config(conn)
    model = standin(arch_cfg)
    store.read_weights(conn, model)
    state = store.read_train_state(conn)
    model.params["head"].data[...] += 1.0
    model.params["layers.0.fc1"].v[...] *= 2.0
    state["step"] = 21
    store.save_checkpoint(conn, model, train_cfg, state, 2.5, None)
    conn.close()
    loaded = load_db(v1_db)
    assert loaded.step == 21 and loaded.arch == V1_ARCH
    for buf in ("data", "m", "v"):
        assert loaded.params.arenas[buf].tobytes() == model.params.arenas[buf].tobytes()
    assert [s for s, in query(v1_db, "SELECT step FROM checkpoints")] == [0, 10, 20, 21]
    assert version(v1_db) == store.SCHEMA_VERSION


@pytest.mark.parametrize("readonly", [True, False])
def test_a_newer_version_is_refused_and_untouched(v1_db, readonly):
    store.open_database(v1_db, readonly=False).close()
    newer = store.SCHEMA_VERSION + 1
    execute(v1_db, f"PRAGMA user_version = {newer}")
    before = v1_db.read_bytes()
    with pytest.raises(SqlgptError, match=rf"schema version {newer}, newer than this sqlgpt "
                                          rf"supports \({newer - 1}\); upgrade sqlgpt"):
        store.open_database(v1_db, readonly=readonly)
    assert v1_db.read_bytes() == before


def test_every_version_below_the_current_one_has_a_migration():
    assert sorted(store.MIGRATIONS) == list(range(1, store.SCHEMA_VERSION))


# ---- end to end, through the library and the CLI ----
def test_a_version_1_model_gives_the_logits_it_gave(v1_db):
    import sqlgpt
    before = v1_db.read_bytes()
    expected = np.load(DATA / "v1_model_logits.npz")
    logits = sqlgpt.load(v1_db).logits(expected["ids"])
    assert rel_err(logits, expected["logits"]) < 1e-5
    assert v1_db.read_bytes() == before


def test_check_passes_on_a_version_1_file(v1_db):
    from sqlgpt.cli import main
    result = CliRunner().invoke(main, ["check", "--db", str(v1_db)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    assert version(v1_db) == 1  # check only reads


def test_training_resumes_a_version_1_file(v1_db, small_corpus):
    from sqlgpt.cli import main
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--db", str(v1_db),
                                       "--iters", "30", "--resume"])
    assert result.exit_code == 0, result.output
    assert version(v1_db) == store.SCHEMA_VERSION
    loaded = load_db(v1_db)
    assert loaded.step == 30 and loaded.arch == V1_ARCH
    assert [s for s, in query(v1_db, "SELECT step FROM checkpoints")][:3] == [0, 10, 20]
    assert query(v1_db, "SELECT max(step) FROM checkpoints") == [(30,)]
    assert query(v1_db, "SELECT min(step), max(step) FROM metrics WHERE step > 20") == [(21, 30)]


def test_generate_from_a_version_1_file(v1_db):
    from sqlgpt.cli import main
    result = CliRunner().invoke(main, ["generate", "--db", str(v1_db), "--prompt", "the king",
                                       "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def read_committed(db, schema, expected_arch):
    """A committed file of an older schema, loaded as it is: its
    architecture, step 20, its recorded logits, and not a byte changed.
    (model, the recorded ids and logits)."""
    import sqlgpt
    before = db.read_bytes()
    assert version(db) == schema
    model = sqlgpt.load(db)
    assert model.arch == expected_arch and model.step == 20
    expected = np.load(DATA / f"v{schema}_model_logits.npz")
    assert rel_err(model.logits(expected["ids"]), expected["logits"]) < 1e-5
    assert db.read_bytes() == before  # read-only: untouched
    return model, expected


# ---- version 2 -> 3 ----
# tests/data/v2_model.db.gz is a schema-2 database made by 7f64fd2 (gpt2
# preset, char tokenizer, embed 16, 2 heads, 1 layer, seq 8, batch 4, 20
# steps, checkpoints at 10 and 20, on the first 20,000 characters of
# examples/tinyshakespeare.txt); v2_model_logits.npz its logits for "the king".
V2_ARCH = arch.preset("gpt2", n_vocab=62, embed_dim=16, num_heads=2, num_layers=1, seq_len=8)


@pytest.fixture
def v2_db(tmp_path):
    return unpacked("v2_model.db.gz", tmp_path / "v2.db")


def test_version_2_reads_as_it_is_and_migrates_to_3(v2_db):
    import sqlgpt
    model, expected = read_committed(v2_db, 2, V2_ARCH)
    weights, vocab = weights_bytes(v2_db), query(v2_db, "SELECT * FROM vocab ORDER BY id")
    others = {t: query(v2_db, f"SELECT * FROM {t} ORDER BY 1")
              for t in ("config", "tokenizer", "train_state", "checkpoints", "metrics",
                        "evaluations")}
    store.open_database(v2_db, readonly=False).close()
    assert version(v2_db) == store.SCHEMA_VERSION
    assert weights_bytes(v2_db) == weights
    assert query(v2_db, "SELECT * FROM vocab ORDER BY id") == [(*row, None) for row in vocab]
    assert {t: query(v2_db, f"SELECT * FROM {t} ORDER BY 1") for t in others} == others
    # the latest checkpoint's statistics, from its weights
    stats = {row[0]: row for row in query(v2_db, "SELECT name, layer, component, rows, cols, "
                                                 "mean, std, min, max, l2 FROM tensors")}
    state = model.state_dict()
    assert set(stats) == set(state)
    for name, (_, layer, component, rows, cols, mean, std, low, high, l2) in stats.items():
        values = state[name].astype(np.float64)
        assert (rows, cols) == (values.shape if values.ndim == 2 else (1, values.size))
        assert mean == pytest.approx(values.mean(), abs=1e-12)
        assert std == pytest.approx(values.std(), rel=1e-9)
        assert (low, high) == (values.min(), values.max())
        assert l2 == pytest.approx(np.linalg.norm(values), rel=1e-12)
    assert query(v2_db, "SELECT DISTINCT step FROM tensor_stats") == [(20,)]
    assert query(v2_db, "SELECT layer, component FROM tensors WHERE name = 'layers.0.fc1'") == \
        [(0, "fc1")]
    assert rel_err(sqlgpt.load(v2_db).logits(expected["ids"]), expected["logits"]) < 1e-5


def test_a_migrated_version_2_file_has_the_tables_of_a_new_one(v2_db, tmp_path):
    store.open_database(v2_db, readonly=False).close()
    new = tmp_path / "new.db"
    write_db(new, V2_ARCH, TrainConfig(tokenizer="word", vocab_size=60), save_at=())
    assert table_layout(v2_db) == table_layout(new)


def test_a_damaged_version_2_file_is_not_migrated(v2_db):
    execute(v2_db, "UPDATE layers SET data = zeroblob(length(data)) WHERE component = 'q' "
                   "AND i = 0")
    before = v2_db.read_bytes()
    with pytest.raises(SqlgptError, match="cannot migrate .* 2 to 3 .*checksum"):
        store.open_database(v2_db, readonly=False)
    assert version(v2_db) == 2 and v2_db.read_bytes() == before


def test_training_resumes_a_version_2_file(v2_db, tmp_path):
    from sqlgpt.cli import main
    (tmp_path / "v2.db.tokens").unlink(missing_ok=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text((Path(__file__).resolve().parent.parent / "examples" /
                       "tinyshakespeare.txt").read_text()[:20000])
    result = CliRunner().invoke(main, ["train", str(corpus), "--db", str(v2_db), "--iters", "25",
                                       "--resume"])
    assert result.exit_code == 0, result.output
    assert query(v2_db, "SELECT DISTINCT step FROM tensor_stats ORDER BY step") == [(20,), (25,)]


def test_a_refused_resume_of_version_2_leaves_it_as_it_was(v2_db, small_corpus):
    from sqlgpt.cli import main
    execute(v2_db, "UPDATE train_state SET value = '{\"bit_generator\": \"nope\"}' "
                   "WHERE key = 'rng'")
    before = v2_db.read_bytes()
    result = CliRunner().invoke(main, ["train", "--db", str(v2_db), "--iters", "30", "--resume"])
    assert result.exit_code == 1 and "train_state table is damaged" in result.output
    assert v2_db.read_bytes() == before and version(v2_db) == 2


def test_datasette_metadata_needs_version_3(v2_db):
    from sqlgpt.cli import main
    result = CliRunner().invoke(main, ["datasette-metadata", "--db", str(v2_db)])
    assert result.exit_code == 1 and "need version 3" in result.output


# ---- version 3 -> 4 ----
# tests/data/v3_model.db.gz is a schema-3 database made by a98bc2a (llama
# preset, char tokenizer, embed 32, 2 heads, 1 kv head, 1 layer, seq 8, batch
# 4, 20 steps, checkpoints at 10 and 20, on the first 20,000 characters of
# examples/tinyshakespeare.txt); v3_model_logits.npz its logits for "the king".
V3_ARCH = arch.preset("llama", n_vocab=62, embed_dim=32, num_heads=2, kv_heads=1, num_layers=1,
                      seq_len=8)


@pytest.fixture
def v3_db(tmp_path):
    return unpacked("v3_model.db.gz", tmp_path / "v3.db")


def test_version_3_reads_as_it_is_and_migrates_to_4_keeping_every_row(v3_db):
    import sqlgpt
    model, expected = read_committed(v3_db, 3, V3_ARCH)
    tables = [t for t in store.tables_at(3)]
    rows = {t: query(v3_db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    store.open_database(v3_db, readonly=False).close()
    assert version(v3_db) == store.SCHEMA_VERSION
    assert {t: query(v3_db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables} == rows
    assert query(v3_db, "SELECT count(*) FROM quantized") == [(0,)]
    assert rel_err(sqlgpt.load(v3_db).logits(expected["ids"]), expected["logits"]) < 1e-5


def test_a_migrated_version_3_file_has_the_tables_of_a_new_one_and_quantizes(v3_db, tmp_path):
    from sqlgpt.cli import main
    store.open_database(v3_db, readonly=False).close()
    new = tmp_path / "new.db"
    write_db(new, V3_ARCH, TrainConfig(tokenizer="word", vocab_size=60), save_at=())
    assert table_layout(v3_db) == table_layout(new)
    result = CliRunner().invoke(main, ["quantize", "--db", str(v3_db), "--bits", "8"])
    assert result.exit_code == 0, result.output


# ---- version 4 -> 5 ----
# tests/data/v4_model.db.gz is a schema-4 database made by 3bd992b (llama
# preset, char tokenizer, embed 32, 2 heads, 1 kv head, 1 layer, seq 8, batch
# 4, 20 steps, checkpoints at 10 and 20, on the first 20,000 characters of
# examples/tinyshakespeare.txt, then `sqlgpt quantize --bits 8`);
# v4_model_logits.npz its logits for "the king".
V4_ARCH = V3_ARCH


@pytest.fixture
def v4_db(tmp_path):
    return unpacked("v4_model.db.gz", tmp_path / "v4.db")


def test_version_4_reads_as_it_is_and_migrates_keeping_every_row(v4_db):
    import sqlgpt
    model, expected = read_committed(v4_db, 4, V4_ARCH)
    tables = [t for t in store.tables_at(4)]
    rows = {t: query(v4_db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    assert rows["quantized"]  # the int8 copy is among the rows kept
    store.open_database(v4_db, readonly=False).close()
    assert version(v4_db) == store.SCHEMA_VERSION == 6
    assert {t: query(v4_db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables} == rows
    for table in ("classifier", "labels", "classifier_evals"):
        assert query(v4_db, f"SELECT count(*) FROM {table}") == [(0,)]
    assert rel_err(sqlgpt.load(v4_db).logits(expected["ids"]), expected["logits"]) < 1e-5
    assert rel_err(sqlgpt.load(v4_db, "int8").logits(expected["ids"]), expected["logits"]) < 0.05


def test_a_migrated_version_4_file_has_the_tables_of_a_new_one(v4_db, tmp_path):
    store.open_database(v4_db, readonly=False).close()
    new = tmp_path / "new.db"
    write_db(new, V4_ARCH, TrainConfig(tokenizer="word", vocab_size=60), save_at=())
    assert table_layout(v4_db) == table_layout(new)


# ---- version 5 -> 6 ----
# tests/data/v5_model.db.gz is a schema-5 database made by 78d7c67's `sqlgpt
# import` of a Q8_0 GGUF file (a tied llama: 300 ids, embed 64, 2 heads, 1
# kv head, 1 layer, MLP 96, seq 16, random weights): every tensor as float32
# rows, beside the int8 copy from the file's blocks; v5_model_logits.npz its
# logits for "the king".
@pytest.fixture
def v5_db(tmp_path):
    return unpacked("v5_model.db.gz", tmp_path / "v5.db")


def test_version_5_reads_as_it_is_and_migrates_keeping_every_row(v5_db):
    import sqlgpt
    before = v5_db.read_bytes()
    assert version(v5_db) == 5
    expected = np.load(DATA / "v5_model_logits.npz")
    model = sqlgpt.load(v5_db)
    assert (model.arch.embed_dim, model.arch.n_vocab, model.arch.tie_weights) == (64, 300, True)
    assert rel_err(model.logits(expected["ids"]), expected["logits"]) < 1e-5  # any build's sums
    greedy = sqlgpt.load(v5_db, "int8").generate("the king", max_tokens=8, temperature=0)
    assert v5_db.read_bytes() == before  # read-only: untouched
    tables = store.tables_at(5)
    rows = {t: query(v5_db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    assert rows["quantized"] and rows["layers"]  # float32 rows beside the int8 copy
    store.open_database(v5_db, readonly=False).close()
    assert version(v5_db) == store.SCHEMA_VERSION == 6
    assert {t: query(v5_db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables} == rows
    assert query(v5_db, "SELECT count(*) FROM tensor_formats") == [(0,)]
    assert rel_err(sqlgpt.load(v5_db).logits(expected["ids"]), expected["logits"]) < 1e-5
    assert sqlgpt.load(v5_db, "int8").generate("the king", max_tokens=8, temperature=0) == greedy


def test_a_migrated_version_5_file_has_the_tables_of_a_new_one(v5_db, tmp_path):
    store.open_database(v5_db, readonly=False).close()
    new = tmp_path / "new.db"
    write_db(new, V4_ARCH, TrainConfig(tokenizer="word", vocab_size=60), save_at=())
    assert table_layout(v5_db) == table_layout(new)
