"""The database as an interface in plain SQL: the tensors view and the
tensor_stats history, token counts, the corpus record, one file at rest,
and the README's queries replayed against the model its command trains."""
import re
import shlex
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main
from sqlgpt.errors import SqlgptError

from conftest import ROOT, TINY
from helpers import query


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt2_db(tmp_path_factory, small_corpus):
    db = tmp_path_factory.mktemp("sql") / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 20, "--save-every", 10, *TINY,
                 "--preset", "gpt2", "--tokenizer", "char", "--vocab-size", 0)
    assert result.exit_code == 0, result.output
    return db


def test_the_tensors_view_summarizes_the_latest_weights(gpt2_db):
    weights = sqlgpt.load(gpt2_db).state_dict()
    found = {name: rest for name, *rest in query(
        gpt2_db, "SELECT name, layer, component, rows, cols, mean, std, min, max, l2 FROM tensors")}
    assert set(found) == set(weights)  # tied head: no row of its own
    for name, (layer, component, n_rows, cols, mean, std, low, high, l2) in found.items():
        values = weights[name].astype(np.float64)
        assert (n_rows, cols) == (values.shape if values.ndim == 2 else (1, values.size))
        assert component == name.split(".")[-1]
        assert layer == (int(name.split(".")[1]) if name.startswith("layers.") else None)
        assert mean == pytest.approx(values.mean(), abs=1e-9)
        assert std == pytest.approx(values.std(), rel=1e-6)
        assert (low, high) == (values.min(), values.max())
        assert l2 == pytest.approx(np.linalg.norm(values), rel=1e-9)


def test_every_checkpoint_keeps_its_statistics(gpt2_db):
    steps = query(gpt2_db, "SELECT step, count(*) FROM tensor_stats GROUP BY step")
    n = len(sqlgpt.load(gpt2_db).state_dict())
    assert steps == [(0, n), (10, n), (20, n)]
    grew = query(gpt2_db, "SELECT step, l2 FROM tensor_stats WHERE name = 'layers.0.q' "
                         "ORDER BY step")
    assert len({l2 for _, l2 in grew}) == 3  # the weights moved between checkpoints


def test_vocab_counts_are_the_corpus_token_counts(gpt2_db):
    model = sqlgpt.load(gpt2_db)
    tokens = np.fromfile(f"{gpt2_db}.tokens", dtype="<u2")
    counts = dict(query(gpt2_db, "SELECT id, count FROM vocab"))
    assert [counts[i] for i in range(model.arch.n_vocab)] == \
        np.bincount(tokens, minlength=model.arch.n_vocab).tolist()


def test_the_corpus_is_recorded_and_shown(gpt2_db, small_corpus):
    model = sqlgpt.load(gpt2_db)
    assert model.corpus["files"] == [{"path": str(small_corpus.resolve()),
                                      "bytes": small_corpus.stat().st_size}]
    assert model.corpus["tokens"] == small_corpus.stat().st_size  # char: one id per character
    import hashlib
    assert model.corpus["sha256"] == hashlib.sha256(small_corpus.read_bytes()).hexdigest()
    out = run("info", "--db", gpt2_db).output
    assert "corpus: 1 file, " in out
    assert f"  {small_corpus.resolve()} ({small_corpus.stat().st_size:,} bytes)" in out


def test_the_model_is_one_file_at_rest(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 3, *TINY).exit_code == 0
    beside = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    assert beside() == ["m.db", "m.db.tokens"]
    for command in (["generate", "--db", db, "--max-tokens", 3], ["info", "--db", db],
                    ["check", "--db", db], ["eval", "--db", db, small_corpus]):
        assert run(*command).exit_code == 0
        assert beside() == ["m.db", "m.db.tokens"], command
    sqlgpt.load(db)
    assert run("train", small_corpus, "--db", db, "--iters", 5, "--resume").exit_code == 0
    assert beside() == ["m.db", "m.db.tokens"]


def test_a_reader_during_training_keeps_working(tmp_path, small_corpus):
    """A reader inside a transaction while the trainer commits and closes:
    it keeps its snapshot, the file stays in WAL mode (whole) until a writer
    closes it alone, and then it is one file again."""
    from sqlgpt.train.trainer import Trainer
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 2, *TINY).exit_code == 0
    trainer = Trainer.resume(db)
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reader.execute("BEGIN")
    assert reader.execute("SELECT max(step) FROM checkpoints").fetchone() == (2,)
    trainer.run(4, save_every=1)
    assert reader.execute("SELECT max(step) FROM checkpoints").fetchone() == (2,)
    trainer.close()
    reader.execute("COMMIT")
    assert reader.execute("SELECT max(step) FROM checkpoints").fetchone() == (4,)
    reader.close()
    assert sqlgpt.load(db).step == 4 and store.integrity_check(db) == []
    assert run("train", small_corpus, "--db", db, "--iters", 5, "--resume").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db", "m.db.tokens"]


@pytest.mark.parametrize("sql", [
    "CREATE VIEW tensors2 AS SELECT 1",
    "DROP VIEW tensors",  # then one of the same name that does something else
])
def test_a_view_sqlgpt_did_not_create_is_refused(gpt2_db, tmp_path, sql):
    db = tmp_path / "copy.db"
    shutil.copy(gpt2_db, db)
    conn = sqlite3.connect(db)
    conn.execute(sql)
    if sql.startswith("DROP"):
        conn.execute("CREATE VIEW tensors AS SELECT * FROM config")
    conn.commit()
    conn.close()
    with pytest.raises(SqlgptError, match="views or triggers sqlgpt did not create"):
        sqlgpt.load(db)


# ---- the README's queries, replayed (docs/sql.md holds them) ----
def readme_queries():
    """(training command, [(query, printed output)]) of the ten in docs/sql.md."""
    text = (ROOT / "docs" / "sql.md").read_text()
    section = text[text.index("## Ten questions in plain SQL"):]
    command = re.search(r"```sh\n(sqlgpt train [^\n]+)\n```", section).group(1)
    block = re.search(r"```\n(\$ sqlite3 .*?)\n```", section, re.S).group(1)
    queries = []
    for part in re.split(r"^\$ ", block, flags=re.M)[1:]:
        line, _, output = part.partition("\n")
        queries.append((shlex.split(line), output))
    return command, queries


def same_output(printed, got):
    """The same table: text cells equal, numbers within 2% (a different CPU
    may round the last digits of 200 steps of training differently)."""
    a, b = printed.split(), got.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            if x != y:
                return False
            continue
        if not abs(fx - fy) <= 0.02 * max(abs(fx), abs(fy)) + 2e-3:
            return False
    return True


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 shell")
def test_the_readme_queries_print_what_the_readme_shows(tmp_path):
    command, queries = readme_queries()
    assert len(queries) == 10
    shutil.copy(ROOT / "examples" / "tinyshakespeare.txt", tmp_path)
    args = shlex.split(command)[1:]
    args[args.index("examples/tinyshakespeare.txt")] = str(tmp_path / "tinyshakespeare.txt")
    args[args.index("model.db")] = str(tmp_path / "model.db")
    result = run(*args)
    assert result.exit_code == 0, result.output
    for argv, printed in queries:
        assert argv[0] == "sqlite3" and "model.db" in argv
        argv = [str(tmp_path / "model.db") if a == "model.db" else a for a in argv]
        got = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        assert same_output(printed, got), (argv[-1], printed, got)


def test_the_readme_queries_are_the_shipped_ones():
    from sqlgpt.store.queries import QUERIES
    _, queries = readme_queries()
    assert [argv[-1] for argv, _ in queries] == [sql for _, sql in QUERIES.values()]


def test_datasette_serves_the_model_with_metadata(gpt2_db, tmp_path):
    datasette = pytest.importorskip("datasette.app")
    import asyncio
    import json
    out = tmp_path / "metadata.json"
    result = run("datasette-metadata", "--db", gpt2_db, "-o", out)
    assert result.exit_code == 0, result.output
    metadata = json.loads(out.read_text())

    async def fetch():
        ds = datasette.Datasette([str(gpt2_db)], metadata=metadata)
        index = (await ds.client.get("/m.json")).json()
        tensors = (await ds.client.get("/m/tensors.json?_shape=objects")).json()
        curve = (await ds.client.get("/m/loss_curve.json?_shape=objects")).json()
        best = (await ds.client.get("/m/best_checkpoint.json?_shape=objects")).json()
        return index, tensors, curve, best
    index, tensors, curve, best = asyncio.run(fetch())
    shown = {t["name"] for t in index["tables"] if not t["hidden"]}
    assert {"metrics", "tensor_stats", "vocab"} <= shown and not shown & {"layers", "embeddings"}
    assert {v["name"] for v in index["views"]} == {"tensors"}
    assert {row["name"] for row in tensors["rows"]} == set(sqlgpt.load(gpt2_db).state_dict())
    assert [row["step"] for row in curve["rows"]] == []  # 20 steps: none is a multiple of 40
    assert best["rows"][0]["step"] in (10, 20)
    assert {q["name"] for q in index["queries"]} >= {"loss_curve", "commonest_tokens"}
    result = run("datasette-metadata", "--db", tmp_path / "none.db")
    assert result.exit_code == 1
