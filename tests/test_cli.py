"""The command line as a user meets it: clean one-line errors, never a
traceback, and an existing database left byte-for-byte unchanged."""
import json
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from sqlgpt.cli import main

from conftest import ROOT, TINY


def sqlgpt_cmd(*args):
    """Run the installed `sqlgpt` entry point in a subprocess (from a neutral
    directory, so the source tree's uncompiled package is not imported)."""
    return subprocess.run([sys.executable, "-c", "from sqlgpt.cli import main; main()",
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())


def test_generate_and_info(trained_db):
    out = sqlgpt_cmd("generate", "--db", trained_db, "--prompt", "the citizen", "--max-tokens", 8,
                     "--seed", 1)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the citizen") and len(out.stdout.split()) == 10
    bf16 = sqlgpt_cmd("generate", "--db", trained_db, "--prompt", "the citizen",
                      "--max-tokens", 8, "--precision", "bf16")
    assert bf16.returncode == 0 and len(bf16.stdout.split()) == 10, bf16.stderr
    bad = sqlgpt_cmd("generate", "--db", trained_db, "--precision", "fp8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "fp8" in bad.stderr
    info = sqlgpt_cmd("info", "--db", trained_db, "--json")
    assert info.returncode == 0
    report = json.loads(info.stdout.strip().splitlines()[-1])
    assert report["step"] == 30 and report["config"]["num_heads"] == 4
    assert [c["step"] for c in report["checkpoints"]] == [0, 10, 20, 30]
    text = sqlgpt_cmd("info", "--db", trained_db).stdout
    assert "parameters" in text and "embed_dim" in text


def test_train_json_is_the_last_line(tmp_path, small_corpus):
    out = sqlgpt_cmd("train", small_corpus, "--db", tmp_path / "m.db", "--iters", 3, *TINY,
                     "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["final_loss"] > 0 and summary["tokens_per_sec"] > 0


def bad_corpus(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    path.write_bytes({"empty": b"", "blank": b"  \n\n ", "binary": bytes(range(256)) * 10,
                      "latin1": "café déjà vu ".encode("latin-1") * 50,
                      "nul": b"text\x00with nul bytes " * 50,
                      "punctuation": b"!!! ... ??? ---" * 10,
                      "tiny": b"just four words"}[kind])
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "blank", "binary", "latin1",
                                  "nul", "punctuation", "tiny"])
def test_bad_corpus_is_a_clean_error_and_leaves_the_database_alone(tmp_path, trained_db, kind):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    before = db.read_bytes()
    corpus = bad_corpus(tmp_path, kind)
    for extra in ([], ["--resume"], ["--overwrite"]):
        out = sqlgpt_cmd("train", corpus, "--db", db, "--iters", 2, *([] if extra else TINY),
                         *extra)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr
        assert out.stderr.startswith("Error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert db.read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--embed-dim", "30", "--heads", "4"], "must divide"),
    (["--dropout", "1.5"], "dropout"),
    (["--lr", "-1"], "lr"),
    (["--layers", "0"], "num_layers"),
    (["--seq-len", "5000"], "too few"),
])
def test_impossible_configs_are_refused(tmp_path, small_corpus, args, message):
    db = tmp_path / "new.db"
    base = dict(zip(TINY[::2], TINY[1::2]))
    base.update(dict(zip(args[::2], args[1::2])))
    out = sqlgpt_cmd("train", small_corpus, "--db", db, "--iters", 2,
                     *[x for kv in base.items() for x in kv])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert message in out.stderr
    assert not db.exists()


@pytest.mark.parametrize("content", [b"", b"not a database at all", b"SQLite format 3\x00garbage"])
@pytest.mark.parametrize("command", ["generate", "info", "train"])
def test_databases_that_are_not_sqlgpts(tmp_path, small_corpus, content, command):
    db = tmp_path / "x.db"
    db.write_bytes(content)
    args = {"generate": ["generate", "--db", db], "info": ["info", "--db", db],
            "train": ["train", small_corpus, "--db", db, "--resume", "--iters", 3]}[command]
    out = sqlgpt_cmd(*args)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("Error: ")
    assert db.read_bytes() == content


def test_another_apps_sqlite_database_is_not_touched(tmp_path, small_corpus):
    import sqlite3
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('keep me')")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    for args in (["generate", "--db", db], ["train", small_corpus, "--db", db, "--resume"],
                 ["train", small_corpus, "--db", db, *TINY]):
        out = sqlgpt_cmd(*args)
        assert out.returncode != 0 and "Traceback" not in out.stderr
    assert db.read_bytes() == before


def test_missing_database_and_unknown_prompt(tmp_path, trained_db):
    out = sqlgpt_cmd("generate", "--db", tmp_path / "nope.db")
    assert out.returncode != 0 and "does not exist" in out.stderr
    assert not (tmp_path / "nope.db").exists()
    before = trained_db.read_bytes()
    out = sqlgpt_cmd("generate", "--db", trained_db, "--prompt", "xyzzy plugh")
    assert out.returncode != 0 and "vocabulary" in out.stderr and "Traceback" not in out.stderr
    assert trained_db.read_bytes() == before


def test_every_command_and_option_is_documented_in_docs_commands():
    """Every command has its section, with every option, in docs/commands.md,
    and is listed in the README's table of commands."""
    readme = (ROOT / "README.md").read_text()
    commands = (ROOT / "docs" / "commands.md").read_text()
    for name, command in main.commands.items():
        assert f"sqlgpt {name}" in commands, name
        assert f"sqlgpt {name}" in readme, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert re.search(re.escape(opt) + r"\b", commands), f"{name} {opt}"


def test_overwrite_refuses_files_that_are_not_sqlgpt_databases(tmp_path, small_corpus):
    import sqlite3
    app = tmp_path / "app.db"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(small_corpus.read_text())
    for target in (app, corpus):
        before = target.read_bytes()
        out = sqlgpt_cmd("train", corpus, "--db", target, *TINY, "--iters", 2, "--overwrite")
        assert out.returncode == 1 and "not a sqlgpt database" in out.stderr
        assert target.read_bytes() == before


def test_usage_errors_are_one_line(tmp_path):
    for args in (["generate", "--db", tmp_path / "x.db", "--seed", "-1"], ["train"],
                 ["no-such-command"], ["generate", "--db", tmp_path / "x.db", "--top-p", "0"]):
        out = sqlgpt_cmd(*args)
        assert out.returncode == 2 and out.stderr.startswith("Error: ")
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_json_is_strict_even_when_the_loss_diverged(capsys):
    from sqlgpt.cli.common import emit_json
    emit_json({"final_loss": float("nan"), "nested": [float("inf"), 1.5]})
    line = capsys.readouterr().out.strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == \
        {"final_loss": None, "nested": [None, 1.5]}
