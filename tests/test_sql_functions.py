"""sqlgpt's SQL functions on an app's own connection (register), the
connections with sqlite-vec (connect, and `sqlgpt sql`), and the example app."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.sql.functions import MAX_TOKENS, can_load_extensions

from conftest import ROOT, TINY


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def char_db(tmp_path_factory, small_corpus):
    db = tmp_path_factory.mktemp("fn") / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 30, *TINY, "--preset", "gpt2",
                 "--tokenizer", "char", "--vocab-size", 0)
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture
def conn(char_db):
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    sqlgpt.register(conn, char_db)
    yield conn
    conn.close()


def one(conn, sql, *params):
    return conn.execute(sql, params).fetchone()[0]


def test_generate_is_the_api_continuation_for_the_same_seed(conn, char_db):
    model = sqlgpt.load(char_db)
    for prompt, seed in (("the king", 1), ("First Citizen:", 7)):
        text = one(conn, "SELECT sqlgpt_generate(?, 20, 0.8, ?)", prompt, seed)
        assert model.generate(prompt, 20, 0.8, seed=seed) == prompt + text
    greedy = one(conn, "SELECT sqlgpt_generate('the king', 12, 0)")
    assert greedy == one(conn, "SELECT sqlgpt_generate('the king', 12, 0, 5)")
    assert len(model.encode(one(conn, "SELECT sqlgpt_generate('the', 5, 1.0)"))) <= 5
    assert one(conn, "SELECT sqlgpt_generate('the', 0)") == ""
    assert isinstance(one(conn, "SELECT sqlgpt_generate('')"), str)  # a new document


def test_generate_matches_the_cli_for_the_same_seed(conn, char_db):
    result = run("generate", "--db", char_db, "--prompt", "the king", "--max-tokens", 15,
                 "--temperature", 0.8, "--seed", 3)
    assert result.output == "the king" + one(conn, "SELECT sqlgpt_generate('the king', 15, "
                                                   "0.8, 3)") + "\n"


def test_tokens_are_the_tokenizer_ids(conn, char_db):
    model = sqlgpt.load(char_db)
    for text in ("the king's crown", "", "日本 and Ω"):
        assert json.loads(one(conn, "SELECT sqlgpt_tokens(?)", text)) == \
            [int(i) for i in model.encode(text)]


def test_logprob_is_the_sum_of_next_token_log_probabilities(conn, char_db):
    model = sqlgpt.load(char_db)
    text = "the king"  # within the context, <eos> included
    ids = [model.tokenizer.eos_id, *map(int, model.encode(text))]
    logits = model.logits(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    expected = sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
    assert one(conn, "SELECT sqlgpt_logprob(?)", text) == pytest.approx(expected, rel=1e-5)
    # longer than the context: every token scored once, in windows
    long = "the king is dead, long live the king! " * 3
    assert one(conn, "SELECT sqlgpt_logprob(?)", long) < one(conn, "SELECT sqlgpt_logprob(?)",
                                                              text)
    assert one(conn, "SELECT sqlgpt_logprob('')") is None


def test_embed_is_the_mean_final_hidden_state_as_a_vector_blob(conn, char_db):
    model = sqlgpt.load(char_db)
    blob = one(conn, "SELECT sqlgpt_embed('the king')")
    vector = np.frombuffer(blob, "<f4")
    assert vector.shape == (model.arch.embed_dim,)
    gpt = model._gpt
    gpt.forward(np.asarray(model.encode("the king"), dtype=np.int32)[None])
    hidden = gpt.acts.buffers["lnf"][:len(model.encode("the king"))]
    np.testing.assert_allclose(vector, hidden.mean(0), rtol=1e-5, atol=1e-6)
    # final norm output times the tied head gives the logits: a real hidden state
    np.testing.assert_allclose(hidden @ model.state_dict()["wte"].T,
                               model.logits(model.encode("the king")), rtol=1e-4, atol=1e-4)
    long = one(conn, "SELECT sqlgpt_embed(?)", "the king " * 10)  # over the context
    assert len(long) == 4 * model.arch.embed_dim


@pytest.mark.parametrize("sql, message", [
    ("SELECT sqlgpt_generate(NULL)", "sqlgpt_generate: prompt is NULL"),
    ("SELECT sqlgpt_generate(3)", "prompt must be TEXT"),
    (f"SELECT sqlgpt_generate('a', {MAX_TOKENS + 1})", "max_tokens must be an integer from 0"),
    ("SELECT sqlgpt_generate('a', 10000000000000000000)", "max_tokens"),
    ("SELECT sqlgpt_generate('a', -1)", "max_tokens"),
    ("SELECT sqlgpt_generate('a', 'ten')", "max_tokens"),
    ("SELECT sqlgpt_generate('a', 5, -0.5)", "temperature must be a number"),
    ("SELECT sqlgpt_generate('a', 5, 1.0, -3)", "seed must be an integer"),
    ("SELECT sqlgpt_generate('日本')", "none of the prompt's tokens are in the vocabulary"),
    ("SELECT sqlgpt_tokens(NULL)", "sqlgpt_tokens: text is NULL"),
    ("SELECT sqlgpt_tokens(x'00ff')", "text must be TEXT, got bytes"),
    ("SELECT sqlgpt_logprob(NULL)", "sqlgpt_logprob: text is NULL"),
    ("SELECT sqlgpt_embed('')", "sqlgpt_embed: the text has no tokens"),
    ("SELECT sqlgpt_embed(NULL)", "text is NULL"),
])
def test_bad_arguments_are_sql_errors_with_a_clear_message(conn, sql, message):
    with pytest.raises(sqlite3.OperationalError):
        conn.execute(sql).fetchone()
    assert message in one(conn, "SELECT sqlgpt_error()")
    assert one(conn, "SELECT sqlgpt_tokens('ok')")  # the connection goes on


def test_safe_from_several_threads(char_db):
    """A connection per thread (Python's sqlite3 cannot share one between
    threads that call Python functions), kernels running at once."""
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, char_db)
    expected = {seed: one(conn, "SELECT sqlgpt_generate('the', 15, 0.9, ?)", seed)
                for seed in range(6)}
    got, errors = {}, []

    def worker(seed):
        try:
            own = sqlite3.connect(":memory:")
            sqlgpt.register(own, char_db)
            got[seed] = [one(own, "SELECT sqlgpt_generate('the', 15, 0.9, ?)", seed)
                         for _ in range(3)]
            own.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    assert got == {seed: [text] * 3 for seed, text in expected.items()}


def test_one_registration_serves_threads_in_turn(char_db):
    """A connection created with check_same_thread=False, used by one thread
    at a time (the app serializes its queries), from several threads."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    sqlgpt.register(conn, char_db)
    turn, results = threading.Lock(), []

    def worker():
        with turn:
            results.append(one(conn, "SELECT sqlgpt_generate('the', 10, 0)"))
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(set(results)) == 1 and len(results) == 4


def test_an_app_database_with_the_functions(char_db, tmp_path):
    app = tmp_path / "app.db"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, summary TEXT)")
    conn.executemany("INSERT INTO notes (body) VALUES (?)",
                     [("the king is dead",), ("my lord, the queen",), ("to be or not",)])
    conn.commit()
    model_before = char_db.read_bytes()
    sqlgpt.register(conn, char_db)
    conn.execute("UPDATE notes SET summary = sqlgpt_generate(body, 8, 0)")
    conn.commit()
    summaries = [s for s, in conn.execute("SELECT summary FROM notes ORDER BY id")]
    assert all(isinstance(s, str) for s in summaries)
    assert summaries[0] == sqlgpt.load(char_db).generate("the king is dead", 8, 0)[16:]
    assert char_db.read_bytes() == model_before  # the model file is only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_connect_loads_sqlite_vec_and_the_functions(char_db):
    conn = sqlgpt.connect(char_db)
    assert conn.execute("SELECT vec_version()").fetchall()[0][0].startswith("v")
    # nearest neighbours of a token's embedding, by cosine distance over weight rows
    rows = conn.execute("""
        SELECT v.token, vec_distance_cosine(e.data, q.data) AS d
        FROM embeddings e JOIN vocab v ON v.id = e.position,
             (SELECT data FROM embeddings WHERE type = 'wte' AND position = 10) q
        WHERE e.type = 'wte' ORDER BY d LIMIT 3""").fetchall()
    assert rows[0][1] == pytest.approx(0.0, abs=1e-6) and rows[1][1] > 0
    wte = sqlgpt.load(char_db).state_dict()["wte"]
    elements = conn.execute("SELECT value FROM vec_each((SELECT data FROM embeddings WHERE "
                            "type = 'wte' AND position = 10))").fetchall()
    assert [v for v, in elements] == pytest.approx(wte[10].tolist())
    assert json.loads(conn.execute("SELECT sqlgpt_tokens('ab')").fetchall()[0][0])
    with pytest.raises(Exception, match="read-?only|readonly"):
        conn.execute("DELETE FROM metrics")
    conn.close()


def extension_python():
    """A Python of this version whose sqlite3 can load extensions (the
    system's, beside pyenv's), or None."""
    if can_load_extensions():
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/python{version}", "/usr/bin/python3"):
        if Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import sqlite3, sys; sys.exit(0 if hasattr("
                                    "sqlite3.connect(':memory:'), 'enable_load_extension') and "
                                    f"sys.version_info[:2] == {sys.version_info[:2]!r} else 1)"],
                                   capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


@pytest.mark.skipif(extension_python() is None, reason="no Python that loads SQLite extensions")
def test_connect_with_a_python_that_loads_extensions(char_db):
    """The standard library's sqlite3 where it can load extensions (apsw
    otherwise: the test above, on this machine's default Python)."""
    import numpy
    paths = [str(Path(sqlgpt.__file__).parent.parent), str(Path(numpy.__file__).parent.parent)]
    code = ("import sqlgpt, sqlite3; c = sqlgpt.connect(%r); "
            "assert isinstance(c, sqlite3.Connection); "
            "print(c.execute(\"SELECT vec_length(sqlgpt_embed('the'))\").fetchone()[0])" % str(char_db))
    out = subprocess.run([extension_python(), "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)}, timeout=120,
                         cwd=Path(char_db).parent)  # not a checkout whose sqlgpt/ would shadow
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == sqlgpt.load(char_db).arch.embed_dim


def test_connect_says_what_to_do_without_extensions_or_apsw(char_db, monkeypatch):
    import sqlgpt.sql.functions as sql
    monkeypatch.setattr(sql, "can_load_extensions", lambda: False)
    monkeypatch.setitem(sys.modules, "apsw", None)
    with pytest.raises(sqlgpt.SqlgptError, match="cannot load extensions and apsw is not"):
        sqlgpt.connect(char_db)


def test_the_sql_command(char_db):
    result = run("sql", "--db", char_db, "SELECT name, rows, cols FROM tensors WHERE name = 'wte'")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "rows", "cols"] and lines[2].split()[0] == "wte"
    result = run("sql", "--db", char_db, "--json", "SELECT sqlgpt_tokens('ab') AS ids, "
                                                   "data FROM head LIMIT 1")
    assert result.exit_code == 0  # a tied head: no rows, no output
    result = run("sql", "--db", char_db, "--json", "SELECT id, token, bytes FROM vocab "
                                                   "WHERE id = 10")
    row = json.loads(result.output)
    assert row["id"] == 10 and row["bytes"] == "<BLOB 1 bytes>"
    result = run("sql", "--db", char_db, "SELECT nope FROM vocab")
    assert result.exit_code == 1 and "SQL error: no such column: nope" in result.output
    result = run("sql", "--db", char_db, "SELECT sqlgpt_generate(NULL)")
    assert result.exit_code == 1 and "prompt is NULL" in result.output
    shell = CliRunner().invoke(main, ["sql", "--db", str(char_db)],
                               input="SELECT count(*)\nAS n FROM vocab;\nSELECT nope;\n")
    assert shell.exit_code == 0 and "n\n" in shell.output and "no such column" in shell.output
    assert run("sql", "--db", Path(char_db).parent / "missing.db", "SELECT 1").exit_code == 1


def test_the_example_app(char_db, tmp_path):
    shutil.copy(ROOT / "examples" / "notes_app.py", tmp_path)
    out = subprocess.run([sys.executable, "notes_app.py", "--model", str(char_db), "--db",
                          str(tmp_path / "notes.db")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "summaries" in out.stdout and "closest to" in out.stdout
    conn = sqlite3.connect(tmp_path / "notes.db")
    assert conn.execute("SELECT count(*) FROM notes WHERE summary IS NOT NULL").fetchone()[0] > 0


def test_sql_write_commits(char_db, tmp_path):
    db = tmp_path / "w.db"
    shutil.copy(char_db, db)
    result = run("sql", "--db", db, "--write", "INSERT INTO config (key, value) VALUES "
                                               "('note', 'hello')")
    assert result.exit_code == 0, result.output
    assert sqlite3.connect(db).execute("SELECT value FROM config WHERE key = 'note'"
                                       ).fetchone() == ("hello",)
    assert sqlgpt.load(db).step == sqlgpt.load(char_db).step  # unknown keys are ignored
