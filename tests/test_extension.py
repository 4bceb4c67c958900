"""The loadable SQLite extension (sqlgpt0.so): driven from the sqlite3 shell
and from a Python whose sqlite3 loads extensions, against the Python API on
the same databases: the same token ids, the same text for the same seed,
log-probabilities and embeddings within 1e-5; every bad argument and
damaged database a SQL error, never a crash."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.errors import SqlgptError

from conftest import CORPUS
from helpers import slowdown

HERE = Path(__file__).resolve().parent
try:
    EXT = sqlgpt.extension_path()
except SqlgptError:
    EXT = None
pytestmark = pytest.mark.skipif(EXT is None, reason="the extension is not built")
SHELL = shutil.which("sqlite3")


def loader_python():
    """A Python whose sqlite3 can load extensions (this one, or the system's)."""
    probe = "import sqlite3; sqlite3.connect(':memory:').enable_load_extension(True)"
    for candidate in (sys.executable, "/usr/bin/python3", *map(str, sorted(
            Path("/usr/bin").glob("python3.*")))):
        if shutil.which(candidate) and subprocess.run(
                [candidate, "-c", probe], capture_output=True).returncode == 0:
            return candidate
    return None


PYTHON = loader_python()
TEXTS = ["the king is dead", "", "  several   spaces\tand\ttabs\n\nand lines \n", "A",
         "Ünïcödé: ΣΟΦΟΣ σοφός ΟΔΟΣ, İstanbul, straße", "emoji 😀 and 中文 text",
         "_under_score_ and 123 numbers 4.5", "\x0b\x0c\r\n mixed \u00a0nbsp \u3000ideographic",
         "words_and-punctuation!? (yes) \"quoted\" it's"]
# 4 x 2 x 32 models of each tokenizer and position scheme, trained a few steps
MODELS = {
    "char": ["--preset", "gpt2", "--tokenizer", "char"],
    "bpe": ["--preset", "llama", "--kv-heads", "2", "--vocab-size", "300"],
    "word": ["--preset", "lua"],
    "byte": ["--preset", "gpt2", "--tokenizer", "byte", "--pos", "sinusoidal",
             "--no-tie-weights"],
    # heads of 12 whose 48 columns are not the model's 32
    "bpe-wide-heads": ["--preset", "llama", "--kv-heads", "2", "--head-size", "12",
                       "--qkv-bias", "--vocab-size", "300"],
}
SIZE = ["--embed-dim", "32", "--heads", "4", "--layers", "2", "--seq-len", "24",
        "--batch-size", "4", "--iters", "12", "--save-every", "12"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("ext") / "corpus.txt"
    path.write_text(CORPUS.read_text()[:15000] + "\nΣΟΦΟΣ σοφός straße 中文 😀\n")
    return path


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):
    out = {}
    for kind, options in MODELS.items():
        db = tmp_path_factory.mktemp(kind) / "model.db"
        result = CliRunner().invoke(main, ["train", str(corpus), "--db", str(db), *options,
                                           *SIZE])
        assert result.exit_code == 0, result.output
        out[kind] = db
    return out


def client(runs):
    """Each run's query results through the extension, in PYTHON."""
    if PYTHON is None:
        pytest.skip("no Python here whose sqlite3 can load extensions")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"ext": EXT, "runs": runs}, f)
    try:
        done = subprocess.run([PYTHON, str(HERE / "extension_client.py"), f.name],
                              capture_output=True, text=True, timeout=300,
                              cwd=tempfile.gettempdir())
    finally:
        os.unlink(f.name)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def through_python(db, queries, precision="fp32", prefix=""):
    """The same queries through sqlgpt.register (the Python path)."""
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, db, precision, prefix)
    out = []
    for sql in queries:
        try:
            v = conn.execute(sql).fetchone()[0]
            out.append({"blob": v.hex()} if isinstance(v, bytes) else v)
        except sqlite3.Error as e:
            out.append({"error": str(e)})
    return out


def quote(text):
    return "'" + text.replace("'", "''") + "'"


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_same_token_ids(models, corpus, kind):
    # and one 300,000-byte word: BPE merges a piece in O(n log n), as the library does
    texts = TEXTS + [corpus.read_text()[:20000], "ab" * 100000 + "xyz" * 33333]
    queries = [f"SELECT sqlgpt_tokens({quote(t)})" for t in texts]
    ours, = client([{"db": str(models[kind]), "queries": queries}])
    model = sqlgpt.load(models[kind])
    for text, got in zip(texts, ours):
        assert json.loads(got) == [int(i) for i in model.encode(text)], text[:60]


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_same_text_for_the_same_seed(models, kind):
    prompts = ["the king", "", "ΣΟΦΟΣ and a much longer prompt that runs past the context "
               "of twenty-four tokens for every tokenizer here, surely"]
    queries = [f"SELECT sqlgpt_generate({quote(p)}, {n}, {t}, {seed})"
               for p in prompts for n, t, seed in ((30, 0, 1), (40, 1.0, 7), (60, 0.7, 123),
                                                   (5, 1.5, 0))]
    queries += ["SELECT sqlgpt_generate('the king', 0)", "SELECT sqlgpt_generate('the', 3, 2)"]
    ours, = client([{"db": str(models[kind]), "queries": queries}])
    theirs = through_python(models[kind], queries)
    assert ours[:-1] == theirs[:-1]
    assert isinstance(ours[-1], str)  # no seed: fresh entropy, some text


@pytest.mark.parametrize("kind", list(MODELS))
def test_logprob_and_embedding_within_1e5(models, corpus, kind):
    long_text = corpus.read_text()[:600]  # windows slide: half-context strides
    texts = ["the king is dead", long_text, "a"]
    queries = [f"SELECT sqlgpt_logprob({quote(t)})" for t in texts]
    queries += [f"SELECT sqlgpt_embed({quote(t)})" for t in texts[:2]]
    ours, = client([{"db": str(models[kind]), "queries": queries}])
    theirs = through_python(models[kind], queries)
    for a, b in zip(ours[:3], theirs[:3]):
        assert (a is None) == (b is None)
        if a is not None:
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (a, b)
    for a, b in zip(ours[3:], theirs[3:]):
        np.testing.assert_allclose(np.frombuffer(bytes.fromhex(a["blob"]), "<f4"),
                                   np.frombuffer(bytes.fromhex(b["blob"]), "<f4"), atol=1e-5)


CHATS = [[{"role": "user", "content": "hi"}],
         [{"role": "system", "content": "é<eos>"}, {"role": "user", "content": "a"}],
         [{"role": "user", "content": "so many words that the conversation outgrows it"}]]


def with_template(db, folder, template):
    """A copy of db whose train_state holds this chat template."""
    copy = folder / f"chat-{abs(hash(template)) % 10**6}.db"
    shutil.copy(db, copy)
    conn = sqlite3.connect(copy)
    conn.execute("INSERT OR REPLACE INTO train_state (key, value) VALUES ('chat_template', ?)",
                 (json.dumps(template),))
    conn.commit()
    conn.close()
    return copy


@pytest.mark.parametrize("kind", ["char", "bpe", "byte", "word"])
def test_chat_replies_equal_pythons_for_the_templates_it_renders(models, tmp_path, kind):
    from sqlgpt.chat.template import CHATML_TEMPLATE
    queries = [f"SELECT sqlgpt_chat({quote(json.dumps(m))}, {n}, {t}, {seed})"
               for m in CHATS for n, t, seed in ((8, 0, 1), (10, 0.9, 7))]
    queries += ["SELECT sqlgpt_chat('[]')", "SELECT sqlgpt_chat('not json')",
                "SELECT sqlgpt_chat('[{\"role\": \"bot\", \"content\": \"x\"}]')",
                "SELECT sqlgpt_chat('[{\"role\": \"user\"}]')", "SELECT sqlgpt_chat(NULL)"]
    chatml = with_template(models[kind], tmp_path, CHATML_TEMPLATE)
    other = with_template(models[kind], tmp_path, "{{ messages[0]['content'] }}")
    ours = client([{"db": str(db), "queries": queries} for db in (models[kind], chatml)] +
                  [{"db": str(other), "queries": queries[:1]}])
    for db, got in zip((models[kind], chatml), ours):
        want = through_python(db, queries)
        for a, b, sql in zip(got, want, queries):
            if isinstance(b, dict):  # an error: the same one (sqlite3 hides Python's text)
                assert isinstance(a, dict), (sql, a)
                if kind == "word" and db == models[kind] and "chat('[" in sql:
                    assert "no <bos> and <eos>" in a["error"]
            else:
                assert a == b, (sql, a, b)
    if kind != "word":
        assert "context" in ours[0][4]["error"] and "not JSON" in ours[0][7]["error"]
        assert "role 'bot'" in ours[0][8]["error"] and "NULL" in ours[0][10]["error"]
    assert "not one the extension renders" in ours[2][0]["error"]


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_half_precisions_decode_as_the_python_path(models, precision):
    db = models["char"]
    queries = [f"SELECT sqlgpt_generate('the king', 40, {t}, 5)" for t in (0, 1.0)]
    queries.append("SELECT sqlgpt_logprob('the king is dead')")
    ours, = client([{"db": str(db), "setup": [f"SELECT sqlgpt_model('main', '{precision}')"],
                     "queries": queries}])
    theirs = through_python(db, queries, precision)
    assert ours[:2] == theirs[:2]
    assert abs(ours[2] - theirs[2]) <= 1e-6 * abs(theirs[2])  # sums of logs, in another order


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_and_int4_decode_from_the_stored_copy_as_python_does(models, tmp_path, bits):
    db = tmp_path / "model.db"
    shutil.copy(models["bpe"], db)
    shutil.copy(f"{models['bpe']}.tokens", f"{db}.tokens")
    precision = f"int{bits}"
    setup = [f"SELECT sqlgpt_model('main', '{precision}')"]
    queries = [f"SELECT sqlgpt_generate('the king', 30, {t}, 3)" for t in (0, 1.0)]
    queries.append("SELECT sqlgpt_logprob('the king is dead')")
    missing, = client([{"db": str(db), "setup": setup, "queries": queries[:1]}])
    assert f"no int{bits} weights" in missing[0]["error"]
    assert CliRunner().invoke(main, ["quantize", "--db", str(db), "--bits", str(bits)]) \
        .exit_code == 0
    ours, = client([{"db": str(db), "setup": setup, "queries": queries}])
    theirs = through_python(db, queries, precision)
    assert ours[:2] == theirs[:2]
    assert abs(ours[2] - theirs[2]) <= 1e-5 * abs(theirs[2])  # scored in float32, as Python
    result = CliRunner().invoke(main, ["train", "--db", str(db), "--resume", "--iters", "14"])
    assert result.exit_code == 0, result.output
    stale, = client([{"db": str(db), "setup": setup, "queries": queries[:1]}])
    assert "sqlgpt quantize it again" in stale[0]["error"]


def test_another_model_by_file_attached_schema_or_prefix(models, corpus, tmp_path):
    app = tmp_path / "app.db"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('the king is dead'), ('long live the king')")
    conn.execute("CREATE VIEW long_notes AS SELECT body FROM notes WHERE length(body) > 16")
    conn.commit()
    conn.close()
    result = CliRunner().invoke(main, ["train", str(corpus), "--db", str(app), "--prefix",
                                       "gpt_", *MODELS["char"], *SIZE])
    assert result.exit_code == 0, result.output
    query = "SELECT sqlgpt_generate('the', 20, 0)"
    expected = {k: through_python(models[k], [query])[0] for k in ("word", "bpe")}
    runs = [
        {"db": str(app), "setup": [f"SELECT sqlgpt_model({quote(str(models['word']))})"],
         "queries": [query]},
        {"db": str(app), "setup": [f"ATTACH {quote(str(models['bpe']))} AS other",
                                   "SELECT sqlgpt_model('other')"], "queries": [query]},
        {"db": str(app), "setup": ["SELECT sqlgpt_model('main', 'fp32', 'gpt_')"],
         "queries": [query, "SELECT count(sqlgpt_tokens(body)) FROM notes"]},
        {"db": str(app), "queries": [query]},  # no model of its own without a prefix
    ]
    by_file, by_schema, by_prefix, none = client(runs)
    assert by_file == [expected["word"]] and by_schema == [expected["bpe"]]
    assert by_prefix[0] == through_python(app, [query], prefix="gpt_")[0]
    assert by_prefix[1] == 2
    assert "no sqlgpt model" in none[0]["error"]


def test_a_new_checkpoint_is_picked_up_by_the_same_connection(models, tmp_path):
    db, read, trained = tmp_path / "model.db", tmp_path / "read", tmp_path / "trained"
    shutil.copy(models["char"], db)
    shutil.copy(f"{models['char']}.tokens", f"{db}.tokens")
    query = "SELECT sqlgpt_generate('the king', 30, 0)"
    if PYTHON is None:
        pytest.skip("no Python here whose sqlite3 can load extensions")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"ext": EXT, "runs": [{"db": str(db), "queries": [
        query, f"-- touch {read}", f"-- wait {trained}", query]}]}))
    reader = subprocess.Popen([PYTHON, str(HERE / "extension_client.py"), str(job)],
                              stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    try:
        for _ in range(6000):
            if read.exists() or reader.poll() is not None:
                break
            time.sleep(0.01)
        result = CliRunner().invoke(main, ["train", "--db", str(db), "--resume", "--iters", "40"])
        assert result.exit_code == 0, result.output
        trained.touch()
        (before, _, _, after), = json.loads(reader.communicate(timeout=120)[0])
    finally:
        if reader.poll() is None:
            reader.kill()
    assert before == through_python(models["char"], [query])[0]
    assert after == through_python(db, [query])[0]
    assert after != before


def test_hostile_arguments_are_sql_errors(models):
    bad = {
        "SELECT sqlgpt_generate(NULL)": "prompt is NULL",
        "SELECT sqlgpt_generate(42)": "prompt must be TEXT",
        "SELECT sqlgpt_generate('a', -1)": "max_tokens must be an integer from 0 to 4096",
        "SELECT sqlgpt_generate('a', 5000)": "max_tokens must be an integer",
        "SELECT sqlgpt_generate('a', 'x')": "max_tokens must be an integer",
        "SELECT sqlgpt_generate('a', 3, -1)": "temperature must be a number from 0 to 100",
        "SELECT sqlgpt_generate('a', 3, 'hot')": "temperature must be a number",
        "SELECT sqlgpt_generate('a', 3, 1, -5)": "seed must be an integer",
        "SELECT sqlgpt_generate('a', 3, 1, 1.5)": "seed must be an integer",
        "SELECT sqlgpt_tokens(CAST(x'ff41' AS TEXT))": "not valid UTF-8",
        "SELECT sqlgpt_tokens(x'00')": "text must be TEXT",
        "SELECT sqlgpt_tokens(printf('%.*c', 10000001, 'a'))": "longer than 10,000,000",
        "SELECT sqlgpt_embed('')": "has no tokens",
        "SELECT sqlgpt_model(NULL)": "name a schema",
        "SELECT sqlgpt_model('main', 'int3')": "precision is fp32, bf16, f16, int8 or int4",
        "SELECT sqlgpt_model('/nonexistent/dir/x.db')": "is no sqlgpt model this can read",
    }
    ours, = client([{"db": str(models["char"]), "queries": list(bad)}])
    for (sql, message), got in zip(bad.items(), ours):
        assert isinstance(got, dict) and message in got["error"], (sql, got)
    # the connection still works after every refusal
    again, = client([{"db": str(models["char"]), "queries": list(bad) + [
        "SELECT sqlgpt_generate('the', 5, 0)"]}])
    assert isinstance(again[-1], str)


def damage_cases():
    """(name, SQL that damages a copy of a model, what the error says)."""
    return [
        ("checksum", "UPDATE layers SET crc = crc + 1 WHERE i = 3", "checksum"),
        ("short blob", "UPDATE layers SET data = substr(data, 1, 7) WHERE i = 1", "bytes"),
        ("missing row", "DELETE FROM layers WHERE component = 'q' AND i = 2", "rows"),
        ("no such table", "DROP TABLE head", "head"),
        ("newer", "PRAGMA user_version = 99", "newer than this extension reads"),
        ("foreign", "PRAGMA application_id = 7", "no sqlgpt model"),
        ("bad config", "UPDATE config SET value = 5 WHERE key = 'num_heads'", "config"),
        ("vocab", "DELETE FROM vocab WHERE id = 10", "vocab"),
        ("wrong shape", "UPDATE config SET value = 16 WHERE key = 'embed_dim'",
         "bytes, not 64"),
        ("huge config", "UPDATE config SET value = 16384 WHERE key = 'embed_dim'",
         "more than the"),
        ("wide integer", "UPDATE config SET value = 4294967297 WHERE key = 'num_layers'",
         "config num_layers has a bad value 4294967297"),
        ("text integer", "UPDATE config SET value = '6' WHERE key = 'num_layers'",
         "config num_layers has a bad value"),
        ("trigger", "CREATE TRIGGER t AFTER INSERT ON metrics BEGIN DELETE FROM layers; END",
         "views or triggers sqlgpt did not create (t)"),
        ("view", "CREATE VIEW extra AS SELECT 1", "did not create (extra)"),
        ("tensors view replaced", "DROP VIEW tensors; CREATE VIEW tensors AS SELECT name, layer, "
         "component, rows, cols, mean, std, min, max, l2 FROM tensor_stats",
         "did not create (tensors)"),
        ("re-entry", "DROP TABLE checkpoints; CREATE VIEW checkpoints AS SELECT "
         "sqlgpt_tokens('a') AS step", "did not create (checkpoints)"),
        ("extra tensor", "INSERT INTO layers (layer, component, i, data, m, v, crc) SELECT layer, "
                         "'extra', i, data, m, v, crc FROM layers WHERE component = 'q'",
         "belongs to no tensor"),
        ("row of a tensor the config has not", "UPDATE config SET value = 0 WHERE key = 'bias'",
         "belongs to no tensor"),
    ]


def test_damaged_databases_are_sql_errors(models, tmp_path):
    runs, expected = [], []
    for name, sql, message in damage_cases():
        db = tmp_path / f"{name.replace(' ', '_')}.db"
        shutil.copy(models["byte"], db)  # untied: rows in every weight table
        conn = sqlite3.connect(db)
        conn.executescript(sql)
        conn.commit()
        conn.close()
        runs.append({"db": str(db), "queries": ["SELECT sqlgpt_generate('a', 3, 0)",
                                                "SELECT sqlgpt_tokens('a')"]})
        expected.append(message)
    # NaN with a matching checksum
    from sqlgpt.store import row_crc
    db = tmp_path / "nan.db"
    shutil.copy(models["byte"], db)
    conn = sqlite3.connect(db)
    data, m, v = conn.execute("SELECT data, m, v FROM head WHERE i = 0").fetchone()
    nan = np.frombuffer(data, "<f4").copy()
    nan[3] = np.nan
    conn.execute("UPDATE head SET data = ?, crc = ? WHERE i = 0",
                 (nan.tobytes(), row_crc(nan.tobytes(), m, v)))
    conn.commit()
    conn.close()
    runs.append({"db": str(db), "queries": ["SELECT sqlgpt_generate('a', 3, 0)"]})
    expected.append("NaN")
    for (name, *_), result, message in zip(damage_cases() + [("nan",)], client(runs), expected):
        assert isinstance(result[0], dict) and message in result[0]["error"], (name, result)


@pytest.mark.parametrize("sql, message", [
    ("UPDATE tokenizer SET value = (SELECT '[' || group_concat('[4,5]') || ']' FROM "
     "(SELECT 1 UNION ALL SELECT 2)) WHERE key = 'merges'", "tokenizer is damaged"),
    ("UPDATE tokenizer SET value = 'null' WHERE key = 'merges'", "merges are damaged"),
    ("UPDATE tokenizer SET value = ' ?\\S+' WHERE key = 'pattern'", "pre-tokenization pattern"),
    ("UPDATE tokenizer SET value = 'char' WHERE key = 'kind'", "kind is not the config's bpe"),
    ("UPDATE vocab SET bytes = x'41' WHERE id = 299", "two tokens have the same bytes"),
    ("UPDATE vocab SET bytes = x'41', token = 'A' WHERE id = 2", "special id has bytes"),
])
def test_a_damaged_bpe_tokenizer_is_refused(models, tmp_path, sql, message):
    db = tmp_path / "model.db"
    shutil.copy(models["bpe"], db)
    conn = sqlite3.connect(db)
    conn.execute(sql)
    conn.commit()
    conn.close()
    result, = client([{"db": str(db), "queries": ["SELECT sqlgpt_tokens('the king')"]}])
    assert message in result[0]["error"], result
    with pytest.raises(SqlgptError):  # as the Python loader refuses it
        sqlgpt.load(db)


def test_fuzzed_databases_never_crash_the_host(models, tmp_path):
    """Truncations and bit flips of a whole file: every call a result or a SQL error."""
    rng = np.random.default_rng(0)
    pristine = models["byte"].read_bytes()
    con = sqlite3.connect(models["byte"])
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    pristine = models["byte"].read_bytes()
    runs = []
    for case in range(40):
        raw = bytearray(pristine)
        if case % 2:
            raw = raw[:int(rng.integers(100, len(raw)))]
        for _ in range(int(rng.integers(1, 20))):
            raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"fuzz{case}.db"
        path.write_bytes(bytes(raw))
        runs.append({"db": str(path), "queries": ["SELECT sqlgpt_generate('the', 4, 0.8, 1)",
                                                  "SELECT sqlgpt_logprob('the king')"]})
    for result in client(runs):
        for value in result:
            assert value is None or isinstance(value, (str, float)) or "error" in value


def test_the_loader_fuzz_corpus_through_the_extension(models, tmp_path):
    """The loader fuzz tests' damage (test_fuzz_loader.SQL_DAMAGE), a few
    statements at a time: the extension gives a result or a SQL error, and
    refuses every file the Python loader refuses."""
    from test_fuzz_loader import SQL_DAMAGE
    statements = SQL_DAMAGE.elements
    rng = np.random.default_rng(1)
    values = ["0", "-1", "3", "1e12", "0.5", "'x'", "NULL", "''", "65537", "4", "2"]
    keys = ["embed_dim", "num_heads", "num_layers", "seq_len", "n_vocab", "kv_heads", "norm",
            "pos", "mlp", "tie_weights", "final_norm", "norm_eps", "tokenizer"]
    runs, paths = [], []
    for case in range(60):
        path = tmp_path / f"damaged{case}.db"
        shutil.copy(models["byte"], path)
        conn = sqlite3.connect(path)
        for _ in range(int(rng.integers(1, 4))):
            template = statements[int(rng.integers(len(statements)))]
            k = int(rng.integers(0, 2000))
            sql = template.format(k=k, n=k % 600, v=values[int(rng.integers(len(values)))],
                                  key=keys[int(rng.integers(len(keys)))],
                                  wt=["layers", "head", "embeddings", "norms"][k % 4],
                                  tbl=["config", "vocab", "head", "metrics", "norms"][k % 5])
            try:
                conn.execute(sql)
            except sqlite3.Error:
                pass
        conn.commit()
        conn.close()
        paths.append(path)
        runs.append({"db": str(path), "queries": ["SELECT sqlgpt_generate('the', 4, 0.8, 1)",
                                                  "SELECT sqlgpt_embed('the king')"]})
    for path, result in zip(paths, client(runs)):
        for value in result:
            assert value is None or isinstance(value, str) or "blob" in value or \
                "error" in value, value
        try:
            sqlgpt.load(path)
        except SqlgptError:
            assert "error" in result[0], (path, result)  # what Python refuses, C refuses


def test_fuzzed_arguments_are_results_or_sql_errors(models):
    rng = np.random.default_rng(2)
    pool = ["NULL", "0", "-1", "1", "4096", "4097", "9223372036854775807", "-9223372036854775808",
            "1e308", "-0.0", "0.5", "'nan'", "x''", "x'00ff'", "''", "'the king'",
            "CAST(x'c3' AS TEXT)", "CAST(x'eda080' AS TEXT)", "'\u0000'", "char(0)",
            "printf('%.*c', 3000, 'z')", "'😀😀'", "zeroblob(10)", "100.0", "'12'"]
    calls = []
    for _ in range(150):
        name, arity = [("sqlgpt_generate", 4), ("sqlgpt_tokens", 1), ("sqlgpt_logprob", 1),
                       ("sqlgpt_embed", 1)][int(rng.integers(4))]
        n = int(rng.integers(1, arity + 1))
        args = ", ".join(pool[int(rng.integers(len(pool)))] for _ in range(n))
        calls.append(f"SELECT {name}({args})")
    calls.append("SELECT sqlgpt_generate('the', 5, 0)")
    ours, = client([{"db": str(models["char"]), "queries": calls}])
    for sql, value in zip(calls, ours):
        assert value is None or isinstance(value, (str, float)) or "blob" in value or \
            "error" in value, (sql, value)
    assert isinstance(ours[-1], str)  # and the connection still works


def test_threads_share_a_connection(models):
    queries = [f"SELECT sqlgpt_generate('the king', 20, 1.0, {seed})" for seed in range(6)]
    alone, = client([{"db": str(models["char"]), "queries": queries}])
    together, = client([{"db": str(models["char"]), "queries": queries, "threads": 4}])
    assert all(run == alone for run in together)


@pytest.mark.skipif(SHELL is None, reason="no sqlite3 shell")
def test_the_sqlite3_shell(models):
    db = models["bpe"]
    done = subprocess.run([SHELL, str(db), f".load {EXT[:-3]}",
                           "SELECT sqlgpt_generate('the king', 25, 0.8, 42);",
                           "SELECT sqlgpt_tokens('the king');"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text, tokens = done.stdout.rstrip("\n").rsplit("\n", 1)
    expected, ids = through_python(db, ["SELECT sqlgpt_generate('the king', 25, 0.8, 42)",
                                        "SELECT sqlgpt_tokens('the king')"])
    assert text == expected.rstrip("\n") and json.loads(tokens) == json.loads(ids)
    chat = "SELECT sqlgpt_chat('[{\"role\": \"user\", \"content\": \"hi\"}]', 6, 0)"
    done = subprocess.run([SHELL, str(db), f".load {EXT[:-3]}", chat + ";"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.rstrip("\n") == through_python(db, [chat])[0]
    done = subprocess.run([SHELL, str(db), f".load {EXT}", "SELECT sqlgpt_generate(NULL);"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "prompt is NULL" in done.stderr


def test_sqlgpt_model_keeps_out_of_schemas_and_says_one_thing_for_any_unusable_path(
        models, tmp_path):
    app = tmp_path / "app.db"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute(f"CREATE VIEW switch AS SELECT sqlgpt_model('{models['char']}') AS m")
    conn.commit()
    conn.close()
    other = tmp_path / "other.db"  # an app's database, no model in it
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database")
    queries = ["SELECT m FROM switch"] + [f"SELECT sqlgpt_model('{p}')" for p in (
        tmp_path / "missing.db", tmp_path / "no" / "dir.db", other, text)]
    ours, = client([{"db": str(app), "queries": queries}])
    assert "error" in ours[0] and "sqlgpt_model" in ours[0]["error"]  # not from a view
    messages = {r["error"].replace(str(p), "PATH") for r, p in zip(ours[1:], (
        tmp_path / "missing.db", tmp_path / "no" / "dir.db", other, text))}
    assert messages == {"sqlgpt_model: PATH is no sqlgpt model this can read"}


def test_a_long_call_stops_when_the_host_interrupts(corpus, tmp_path):
    """On every SQLite the extension runs on: 3.41 and later say so
    directly; before (Debian's 3.40), a one-row statement asks."""
    db = tmp_path / "wide.db"
    result = CliRunner().invoke(main, ["train", str(corpus), "--db", str(db), "--iters", "1",
                                       "--embed-dim", "512", "--heads", "8", "--layers", "6",
                                       "--seq-len", "256", "--batch-size", "1",
                                       "--tokenizer", "char"])
    assert result.exit_code == 0, result.output
    text = (corpus.read_text() * 20)[:1_000_000]
    queries = [f"SELECT sqlgpt_logprob({quote(text)})", "SELECT sqlgpt_generate('a', 4096, 1, 1)"]
    runs = [{"db": str(db), "queries": [q], "interrupt_after": 0.5} for q in queries]
    for (answer, seconds) in client(runs):
        assert answer == {"error": "interrupted"} or "interrupted" in answer["error"], answer
        assert seconds < 4 * slowdown(), seconds  # uninterrupted, each runs far longer
