"""The plugins through their real hosts: Datasette (its own test client,
queries calling the sqlgpt functions on a configured model, its time limit)
and llm (its CLI and Python API: prompting, chatting, embedding, and the
response in llm's log database)."""
import asyncio
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main

from conftest import CORPUS
from helpers import tiny_chat_models


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    base, chat = tiny_chat_models(folder, CORPUS.read_text()[:40000],
                                  (("one", "two"), ("red", "blue")), 10, 20, 10)
    app = folder / "app.db"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.executemany("INSERT INTO notes VALUES (?)", [("the king",), ("my lord",)])
    conn.commit()
    conn.close()
    return base, chat, app


# ---- Datasette ----

def datasette_query(app, config, sql, settings=None):
    datasette = pytest.importorskip("datasette.app")
    ds = datasette.Datasette([str(app)], metadata={"plugins": {"sqlgpt": config}},
                             settings=settings or {})

    async def go():
        return await ds.client.get("/app.json", params={"sql": sql, "_shape": "array"})
    return asyncio.run(go())


def test_datasette_runs_the_functions_on_the_configured_models(models):
    base, chat, app = models
    config = {"models": {"default": str(base), "talk": str(chat)}}
    r = datasette_query(app, config, "SELECT body, sqlgpt_generate(body, 6, 0) AS more, "
                        "sqlgpt_tokens(body) AS ids FROM notes")
    assert r.status_code == 200, r.text
    rows = r.json()
    model = sqlgpt.load(base)
    for row in rows:
        assert row["body"] + row["more"] == model.generate(row["body"], 6, temperature=0)
        assert json.loads(row["ids"]) == [int(i) for i in model.encode(row["body"])]
    talk = json.dumps([{"role": "user", "content": "Reverse: one two"}])
    r = datasette_query(app, config, f"SELECT sqlgpt_chat('{talk}', 8, 0, NULL, 'talk') AS r")
    assert r.json()[0]["r"] == sqlgpt.load(chat).chat(json.loads(talk), max_tokens=8,
                                                       temperature=0)
    r = datasette_query(app, config, "SELECT sqlgpt_tokens('x', 'nope') AS r")
    assert r.status_code == 400


def test_datasette_classifies_with_a_configured_classifier(models, tmp_path):
    base, _, app = models
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"{w} {k}", "label": k}) + "\n"
                            for w in ("the", "a", "my", "our") for k in ("king", "lord")))
    clf = tmp_path / "clf.db"
    result = run("train", "--task", "classify", "--base", base, rows, "--db", clf,
                 "--iters", "5")
    assert result.exit_code == 0, result.output
    config = {"models": {"default": str(base), "clf": str(clf)}}
    r = datasette_query(app, config, "SELECT body, sqlgpt_classify(body, 'clf') AS label, "
                        "sqlgpt_classify_scores(body, 'clf') AS scores FROM notes")
    assert r.status_code == 200, r.text
    model = sqlgpt.load(clf)
    for row in r.json():
        assert row["label"] == model.classify(row["body"])
        assert json.loads(row["scores"]) == pytest.approx(model.classify_scores(row["body"]))
    for sql in ("SELECT sqlgpt_classify(NULL, 'clf')", "SELECT sqlgpt_classify('the king')"):
        assert datasette_query(app, config, sql).status_code == 400  # NULL; not a classifier


def test_datasette_stops_a_call_at_its_time_limit(models):
    base, _, app = models
    r = datasette_query(app, {"models": {"default": str(base)}},
                        "SELECT sqlgpt_logprob(printf('%.*c', 300000, 'a')) AS r",
                        settings={"sql_time_limit_ms": 30})
    assert r.status_code == 400 and "took too long" in r.text


# ---- llm ----

@pytest.fixture()
def llm_home(tmp_path, monkeypatch):
    pytest.importorskip("llm")
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    return tmp_path


def llm_cli(home, *args):
    return subprocess.run([sys.executable, "-m", "llm", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "LLM_USER_PATH": str(home)},
                          cwd=home)


def test_llm_prompts_a_model_by_its_path_and_logs_it(models, llm_home):
    base, chat, _ = models
    out = llm_cli(llm_home, "-m", f"sqlgpt:{chat}", "Reverse: one two", "-o", "temperature", "0",
                  "-o", "max_tokens", "8")
    assert out.returncode == 0, out.stderr
    want = sqlgpt.load(chat).chat([{"role": "user", "content": "Reverse: one two"}],
                                  max_tokens=8, temperature=0)
    assert out.stdout.rstrip("\n") == want
    logged = json.loads(llm_cli(llm_home, "logs", "-n", "1", "--json").stdout)
    assert logged[0]["response"] == want and logged[0]["model"] == f"sqlgpt:{chat}"
    # a plain model continues the prompt's text
    out = llm_cli(llm_home, "-m", f"sqlgpt:{base}", "the king", "-o", "temperature", "0",
                  "-o", "max_tokens", "6")
    full = sqlgpt.load(base).generate("the king", 6, temperature=0)
    assert out.returncode == 0 and "the king" + out.stdout.rstrip("\n") == full
    bad = llm_cli(llm_home, "-m", f"sqlgpt:{chat}", "x", "-o", "temperature", "9")
    assert bad.returncode != 0 and "temperature" in bad.stderr


def test_llm_python_api_chats_and_embeds_a_registered_model(models, llm_home):
    import llm
    _, chat, _ = models
    out = llm_cli(llm_home, "sqlgpt", "register", chat, "--alias", "talk")
    assert out.returncode == 0 and "registered talk" in out.stdout
    model = llm.get_model("talk")
    conversation = model.conversation()
    first = conversation.prompt("Reverse: one two", temperature=0, max_tokens=8).text()
    second = conversation.prompt("Reverse: red blue", temperature=0, max_tokens=8).text()
    ours = sqlgpt.load(chat)
    talk = [{"role": "user", "content": "Reverse: one two"}]
    assert first == ours.chat(talk, max_tokens=8, temperature=0)
    talk += [{"role": "assistant", "content": first},
             {"role": "user", "content": "Reverse: red blue"}]
    assert second == ours.chat(talk, max_tokens=8, temperature=0)
    vector = llm.get_embedding_model("talk-embed").embed("the king")
    np.testing.assert_allclose(vector, ours.embed("the king"), rtol=1e-6)
