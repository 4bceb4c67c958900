"""A model inside an app's own database: train --prefix gpt_ adds the
prefixed tables beside the app's and touches nothing else (its tables,
views, triggers, rows and PRAGMAs stay byte for byte), through training,
resuming, pruning (--keep), reading and register()."""
import sqlite3
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main
from sqlgpt.errors import SqlgptError

from conftest import TINY
from helpers import weights_bytes


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_app(path, journal_mode="delete"):
    """An app's database: a table with rows, an index, a view, a trigger and
    its own user_version and application_id."""
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode = {journal_mode}")
    conn.executescript("""
        CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, summary TEXT);
        CREATE INDEX notes_body ON notes (body);
        CREATE VIEW short_notes AS SELECT id, body FROM notes WHERE length(body) < 20;
        CREATE TABLE audit (note INTEGER, at TEXT);
        CREATE TRIGGER notes_audit AFTER INSERT ON notes BEGIN
            INSERT INTO audit VALUES (new.id, 'now'); END;
        -- an app table that merely starts like the model's
        CREATE TABLE gpt_notes (x BLOB);
        INSERT INTO gpt_notes VALUES (x'00ff');
        PRAGMA user_version = 7;
        PRAGMA application_id = 1234;
    """)
    conn.executemany("INSERT INTO notes (body) VALUES (?)",
                     [("the king is dead",), ("long live the king, for he is wise",),
                      ("to be or not to be",)])
    conn.commit()
    conn.close()


def app_dump(path, prefix="gpt_"):
    """The app's part of the file: its schema entries, every row of its
    tables, and its PRAGMAs (none of the model's names)."""
    ours = set(store.model_names(prefix))
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        schema = [row for row in conn.execute("SELECT type, name, tbl_name, sql FROM "
                                              "sqlite_master ORDER BY name")
                  if row[1] not in ours and row[2] not in ours]
        rows = {name: conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall()
                for kind, name, _, _ in schema if kind == "table"}
        pragmas = [conn.execute(f"PRAGMA {p}").fetchone()[0]
                   for p in ("user_version", "application_id", "journal_mode", "page_size")]
    finally:
        conn.close()
    return schema, rows, pragmas


def train(db, corpus, *extra, prefix="gpt_"):
    result = run("train", corpus, "--db", db, "--prefix", prefix, "--iters", 20,
                 "--save-every", 10, *TINY, *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_training_leaves_the_app_untouched(tmp_path, small_corpus, journal_mode):
    app = tmp_path / "app.db"
    make_app(app, journal_mode)
    before = app_dump(app)
    train(app, small_corpus, "--keep", 2)
    assert app_dump(app) == before
    result = run("train", "--db", app, "--prefix", "gpt_", "--resume", "--iters", 50,
                 "--save-every", 10, "--keep", 2)  # prunes older checkpoints
    assert result.exit_code == 0, result.output
    assert app_dump(app) == before
    kept = [s for s, in sqlite3.connect(app).execute(
        "SELECT DISTINCT step FROM gpt_checkpoint_weights ORDER BY step")]
    assert kept[-2:] == [40, 50] and len(kept) <= 3  # the last two and the best
    # readers and register() leave it as it is too
    for command in (["generate", "--max-tokens", 5, "--seed", 1], ["info"], ["check"],
                    ["tokenize", "the king"], ["eval", small_corpus]):
        result = run(*command[:1], "--db", app, "--prefix", "gpt_", *command[1:])
        assert result.exit_code == 0, result.output
    conn = sqlite3.connect(app)
    sqlgpt.register(conn, app, prefix="gpt_")
    assert conn.execute("SELECT count(sqlgpt_generate(body, 3, 0.0, 1)) FROM notes") \
        .fetchone() == (3,)
    conn.close()
    assert app_dump(app) == before
    if journal_mode == "delete":  # sqlgpt leaves no -wal or -shm beside it
        assert {p.name for p in tmp_path.iterdir()} == {"app.db", "app.db.gpt_tokens"}
    # the app still works as before, triggers included
    conn = sqlite3.connect(app)
    conn.execute("INSERT INTO notes (body) VALUES ('new')")
    assert conn.execute("SELECT count(*) FROM audit").fetchone() == (4,)
    conn.close()


def test_same_weights_as_a_model_file(tmp_path, small_corpus):
    """The prefix changes where the rows live, nothing about training."""
    app, alone = tmp_path / "app.db", tmp_path / "model.db"
    make_app(app)
    train(app, small_corpus)
    result = run("train", small_corpus, "--db", alone, "--iters", 20, "--save-every", 10,
                 *TINY)
    assert result.exit_code == 0, result.output
    ours, theirs = sqlgpt.load(app, prefix="gpt_"), sqlgpt.load(alone)
    assert ours.step == theirs.step == 20
    a, b = ours.state_dict(), theirs.state_dict()
    assert all(np.array_equal(a[n], b[n]) for n in b)
    assert ours.generate("the king", 10, seed=3) == theirs.generate("the king", 10, seed=3)
    conn = store.open_database(app, prefix="gpt_")
    assert [table for table, *_ in weights_bytes(alone)] == \
        [table for table in store.weight_tables(conn)
         for _ in conn.execute(store.SELECT_SQL[table])]
    conn.close()


def test_two_models_in_one_app(tmp_path, small_corpus):
    app = tmp_path / "app.db"
    make_app(app)
    train(app, small_corpus, prefix="a_")
    train(app, small_corpus, "--preset", "gpt2", "--tokenizer", "char", prefix="b_")
    assert sqlgpt.load(app, prefix="a_").config["preset"] == "lua"
    assert sqlgpt.load(app, prefix="b_").config["preset"] == "gpt2"
    result = run("train", small_corpus, "--db", app, "--prefix", "a_", "--iters", 20,
                 "--overwrite", *TINY, "--seed", 5)
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(app, prefix="b_").config["preset"] == "gpt2"  # the other stays
    assert sqlgpt.load(app, prefix="a_").train_config.seed == 5


def test_refusals(tmp_path, small_corpus):
    app = tmp_path / "app.db"
    make_app(app)
    before = app_dump(app)
    # without --prefix an app's database is not a model, and is never overwritten
    for args in (["generate", "--db", app], ["info", "--db", app],
                 ["train", small_corpus, "--db", app, "--iters", 2, *TINY],
                 ["train", small_corpus, "--db", app, "--iters", 2, "--overwrite", *TINY]):
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert "not a sqlgpt database" in result.output or "already exists" in result.output
    # no model under this prefix (yet)
    result = run("generate", "--db", app, "--prefix", "gpt_")
    assert result.exit_code == 1
    assert "holds no sqlgpt model with the prefix 'gpt_'" in result.output
    result = run("train", "--db", app, "--prefix", "gpt_", "--resume", "--iters", 5)
    assert result.exit_code == 1
    for bad in ("9x", "a-b", "sqlite_", "x" * 40, "a b", "gpt_;DROP"):
        result = run("info", "--db", app, "--prefix", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert "--prefix" in result.output and "Traceback" not in result.output
    with pytest.raises(SqlgptError, match="bad --prefix"):
        sqlgpt.load(app, prefix="1")
    assert app_dump(app) == before
    # a model already there is refused without --overwrite
    train(app, small_corpus)
    result = run("train", small_corpus, "--db", app, "--prefix", "gpt_", "--iters", 5, *TINY)
    assert result.exit_code == 1
    assert "already holds a model with the prefix 'gpt_'" in result.output
    # a sqlgpt model file is not an app's database
    alone = tmp_path / "model.db"
    assert run("train", small_corpus, "--db", alone, "--iters", 2, *TINY).exit_code == 0
    result = run("train", small_corpus, "--db", alone, "--prefix", "gpt_", "--iters", 2, *TINY)
    assert result.exit_code == 1 and "is a sqlgpt model file" in result.output
    # a binary file
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00\x01binary" * 100)
    result = run("train", small_corpus, "--db", junk, "--prefix", "gpt_", "--iters", 2, *TINY)
    assert result.exit_code == 1 and "not a SQLite database" in result.output
    assert junk.read_bytes() == b"\x00\x01binary" * 100


@pytest.mark.parametrize("table, prefix", [("gpt_layers", "gpt_"), ("GPT_LAYERS", "gpt_"),
                                           ("gpt_head", "GPT_")])
def test_a_trigger_on_the_models_tables_is_refused(tmp_path, small_corpus, table, prefix):
    """In any letter case: SQLite's names ignore it."""
    app = tmp_path / "app.db"
    make_app(app)
    train(app, small_corpus)
    conn = sqlite3.connect(app)
    conn.execute(f"CREATE TRIGGER sneaky AFTER UPDATE ON {table} BEGIN "
                 "DELETE FROM notes; END")
    conn.commit()
    conn.close()
    result = run("train", "--db", app, "--prefix", prefix, "--resume", "--iters", 30)
    assert result.exit_code == 1 and "sneaky" in result.output
    assert sqlite3.connect(app).execute("SELECT count(*) FROM notes").fetchone() == (3,)


def test_a_new_app_file_and_a_failed_create(tmp_path, small_corpus):
    """--prefix on a path that does not exist makes it; a failure leaves none."""
    app = tmp_path / "new.db"
    train(app, small_corpus)
    assert sqlgpt.load(app, prefix="gpt_").step == 20
    missing = tmp_path / "other.db"
    result = run("train", tmp_path / "no-such-corpus.txt", "--db", missing, "--prefix", "gpt_",
                 "--iters", 2, *TINY)
    assert result.exit_code == 1
    assert not missing.exists()


def test_compact_writes_a_model_file(tmp_path, small_corpus):
    app = tmp_path / "app.db"
    make_app(app)
    train(app, small_corpus)
    before = app_dump(app)
    out = tmp_path / "small.db"
    result = run("compact", "--db", app, "--prefix", "gpt_", "-o", out)
    assert result.exit_code == 0, result.output
    assert app_dump(app) == before
    assert store.is_sqlgpt_file(out)
    tables = {n for n, in sqlite3.connect(out).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "notes" not in tables and "config" in tables
    small, full = sqlgpt.load(out), sqlgpt.load(app, prefix="gpt_")
    assert small.generate("the king", 8, seed=2) == full.generate("the king", 8, seed=2)


def test_sql_plot_and_datasette_with_a_prefix(tmp_path, small_corpus):
    app = tmp_path / "app.db"
    make_app(app)
    train(app, small_corpus)
    result = run("sql", "--db", app, "--prefix", "gpt_", "--json",
                 "SELECT count(*) AS n, sqlgpt_tokens('the') AS t FROM gpt_tensors")
    assert result.exit_code == 0, result.output
    assert '"n": ' in result.output
    meta = run("datasette-metadata", "--db", app, "--prefix", "gpt_")
    assert meta.exit_code == 0, meta.output
    import json
    queries = json.loads(meta.output)["databases"]["app"]["queries"]
    conn = sqlite3.connect(app)
    for name, query in queries.items():
        assert name.startswith("gpt_")
        conn.execute(query["sql"]).fetchall()  # every canned query runs on the prefixed model
    conn.close()


def test_register_from_threads(tmp_path, small_corpus):
    app = tmp_path / "app.db"
    make_app(app)
    train(app, small_corpus)
    before = app_dump(app)
    main_conn = sqlite3.connect(":memory:")
    sqlgpt.register(main_conn, app, prefix="gpt_")
    expected = main_conn.execute("SELECT sqlgpt_generate('the king', 6, 0.0)").fetchone()[0]
    results, errors = [], []

    def worker():
        try:
            conn = sqlite3.connect(app, check_same_thread=False)
            sqlgpt.register(conn, app, prefix="gpt_")
            for _ in range(3):
                results.append(conn.execute("SELECT sqlgpt_generate('the king', 6, 0.0)")
                               .fetchone()[0])
            conn.close()
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 9
    assert app_dump(app) == before


def test_prefixed_sql_rewrites_only_sqlgpt_names():
    sql = ("INSERT INTO vocab (id, token) SELECT id, word FROM notes JOIN layers USING (id) "
           "WHERE layer = 0 AND EXISTS (SELECT 1 FROM tensors) ORDER BY head")
    assert store.prefixed(sql, "gpt_") == (
        "INSERT INTO gpt_vocab (id, token) SELECT id, word FROM notes JOIN gpt_layers USING (id) "
        "WHERE layer = 0 AND EXISTS (SELECT 1 FROM gpt_tensors) ORDER BY head")
    assert store.prefixed(sql, "") is sql


def test_an_app_table_named_like_the_model_is_never_dropped(tmp_path, small_corpus):
    app = tmp_path / "app.db"
    make_app(app)
    sqlite3.connect(app).executescript("CREATE TABLE GPT_metrics (x TEXT); "
                                       "INSERT INTO GPT_metrics VALUES ('precious');")
    before = app_dump(app, prefix="none_")
    for extra in ([], ["--overwrite"]):
        result = run("train", small_corpus, "--db", app, "--prefix", "gpt_", "--iters", 2,
                     *TINY, *extra)
        assert result.exit_code == 1 and "not a sqlgpt model" in result.output, result.output
    assert app_dump(app, prefix="none_") == before
