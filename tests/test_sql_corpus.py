"""Corpora from SQL (--sql QUERY --from app.db): each row one document, read
through a read-only connection (the app's file is byte for byte unchanged),
recorded with the model so a changed row makes --resume refuse; the same
model as training on the rows written to files; conversations from a
messages column for --chat."""
import hashlib
import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main

from conftest import CORPUS

TINY = ["--preset", "gpt2", "--embed-dim", "32", "--heads", "4", "--layers", "2",
        "--seq-len", "32", "--vocab-size", "300", "--iters", "8", "--batch-size", "4"]
QUERY = "SELECT body FROM notes WHERE body IS NOT NULL ORDER BY id"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def app(tmp_path):
    """An app's database: notes (some NULL), and conversations as JSON."""
    paragraphs = [p for p in CORPUS.read_text()[:40000].split("\n\n") if p.strip()]
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO notes (body) VALUES (?)",
                     [(p,) for p in paragraphs] + [(None,), ("",)])
    conn.execute("CREATE TABLE talks (id INTEGER PRIMARY KEY, messages TEXT)")
    conn.executemany("INSERT INTO talks (messages) VALUES (?)", [(json.dumps(
        [{"role": "user", "content": f"Reverse: {a} {b}"},
         {"role": "assistant", "content": f"{b} {a}"}]),) for a, b in
        (("one", "two"), ("red", "blue"), ("cat", "dog"))] * 10)
    conn.execute("CREATE TABLE blobs (b BLOB)")
    conn.execute("INSERT INTO blobs VALUES (x'00ff')")
    conn.commit()
    conn.close()
    return path, paragraphs


def test_a_query_trains_the_model_its_rows_as_files_train(app, tmp_path):
    path, paragraphs = app
    before = digest(path)
    folder = tmp_path / "rows"
    folder.mkdir()
    for i, p in enumerate(paragraphs):
        (folder / f"{i:05d}.txt").write_text(p)
    assert run("train", "--sql", QUERY, "--from", path, "--db", tmp_path / "q.db",
               *TINY).exit_code == 0
    assert run("train", folder, "--db", tmp_path / "f.db", *TINY).exit_code == 0
    a, b = sqlgpt.load(tmp_path / "q.db"), sqlgpt.load(tmp_path / "f.db")
    assert all(np.array_equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert digest(path) == before  # only read
    # every row its own document: <eos> between each two
    state = store.read_train_state(store.open_database(tmp_path / "q.db"))
    tokens = np.fromfile(tmp_path / "q.db.tokens", dtype=state["tokens"]["dtype"])
    assert (tokens == a.tokenizer.eos_id).sum() == len(paragraphs) - 1
    assert state["corpus"] == [{"sql": QUERY, "from": str(path.resolve()),
                                "rows": len(paragraphs)}]
    info = run("info", "--db", tmp_path / "q.db")
    assert f"--sql {QUERY!r} on {path.resolve()} ({len(paragraphs)} rows)" in info.output


def test_resume_refuses_changed_rows_and_continues_on_the_same(app, tmp_path):
    path, _ = app
    db = tmp_path / "q.db"
    assert run("train", "--sql", QUERY, "--from", path, "--db", db, *TINY).exit_code == 0
    assert run("train", "--sql", QUERY, "--from", path, "--db", db, "--resume",
               "--iters", "10").exit_code == 0
    conn = sqlite3.connect(path)
    conn.execute("UPDATE notes SET body = body || '!' WHERE id = 2")
    conn.commit()
    conn.close()
    result = run("train", "--sql", QUERY, "--from", path, "--db", db, "--resume",
                 "--iters", "12")
    assert result.exit_code == 1 and "is not the corpus" in result.output
    assert sqlgpt.load(db).step == 10


def test_conversations_from_a_messages_column(app, tmp_path):
    path, _ = app
    base = tmp_path / "base.db"
    assert run("train", "--sql", QUERY, "--from", path, "--db", base, *TINY,
               "--seq-len", "64").exit_code == 0
    rows = [json.loads(m) for (m,) in sqlite3.connect(path).execute(
        "SELECT messages FROM talks ORDER BY id")]
    (tmp_path / "talks.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n"
                                                  for m in rows))
    result = run("train", "--chat", "--sql", "SELECT messages FROM talks ORDER BY id",
                 "--from", path, "--base", base, "--db", tmp_path / "c1.db", "--iters", "4")
    assert result.exit_code == 0, result.output
    assert run("train", "--chat", tmp_path / "talks.jsonl", "--base", base, "--db",
               tmp_path / "c2.db", "--iters", "4").exit_code == 0
    a, b = sqlgpt.load(tmp_path / "c1.db"), sqlgpt.load(tmp_path / "c2.db")
    assert all(np.array_equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    scores = run("eval", "--db", tmp_path / "c1.db", "--chat", "--sql",
                 "SELECT messages FROM talks LIMIT 3", "--from", path, "--json")
    assert scores.exit_code == 0 and json.loads(scores.output)["conversations"] == 3


def test_eval_and_tokenize_read_rows(app, tmp_path):
    path, paragraphs = app
    db = tmp_path / "q.db"
    assert run("train", "--sql", QUERY, "--from", path, "--db", db, *TINY).exit_code == 0
    model = sqlgpt.load(db)
    got = run("tokenize", "--db", db, "--sql", "SELECT body FROM notes WHERE id <= 2",
              "--from", path, "--json")
    lines = [json.loads(line) for line in got.output.splitlines()]
    assert [r["ids"] for r in lines] == [[int(i) for i in model.encode(p)]
                                         for p in paragraphs[:2]]
    (tmp_path / "two").mkdir()
    for i, p in enumerate(paragraphs[:5]):
        (tmp_path / "two" / f"{i}.txt").write_text(p)
    by_rows = run("eval", "--db", db, "--sql", "SELECT body FROM notes WHERE id <= 5",
                  "--from", path, "--json")
    by_files = run("eval", "--db", db, tmp_path / "two", "--json")
    assert json.loads(by_rows.output.splitlines()[-1]) == \
        json.loads(by_files.output.splitlines()[-1])


@pytest.mark.parametrize("args,text", [
    (["--sql", "DELETE FROM notes"], "failed"),
    (["--sql", "SELECT b FROM blobs"], "is a BLOB"),
    (["--sql", "SELECT nope FROM notes"], "no such column"),
    (["--sql", "SELECT 1; SELECT 2"], "failed"),
    (["--sql", QUERY, "--from", "missing.db"], "is not a file"),
    (["--sql", QUERY, "corpus.txt"], "name no files too"),
    (["corpus.txt", "--from", "app.db"], "--from goes with --sql"),
])
def test_bad_queries_are_one_line_errors_and_change_nothing(app, tmp_path, args, text):
    path, _ = app
    before = digest(path)
    (tmp_path / "corpus.txt").write_text("hello there")
    args = [str(tmp_path / a) if a in ("missing.db", "corpus.txt") else a for a in args]
    if "--from" not in args:
        args += ["--from", str(path)]
    else:
        args = [str(path) if a == "app.db" else a for a in args]
    result = run("train", *args, "--db", tmp_path / "x.db", *TINY)
    assert result.exit_code != 0 and text in result.output, result.output
    assert digest(path) == before and not (tmp_path / "x.db").exists()
