"""Classifiers: the head's forward and backward against PyTorch, training
from SQL, CSV and JSON Lines to high accuracy, the stored labels and scores,
and classifying from the API, the CLI and SQL."""
import numpy as np
import pytest
import torch

from sqlgpt.errors import SqlgptError
from sqlgpt.model.model import GPT

from architectures import arch_of
from torch_reference import random_weights, reference_classify_loss


def classifier_case(rng, name, pool, labels=3, B=4, lora=None):
    """(model, ids, lens, labels, reference weights) of a random classifier."""
    arch = arch_of(name, num_labels=labels, pool=pool)
    weights = random_weights(arch, rng)
    model = GPT(arch)
    for t in model.params:
        t.data[...] = weights[t.name].numpy()
    T = arch.seq_len
    ids = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    lens = np.array([T, 1, T // 2, 3][:B], dtype=np.int32)
    for b, n in enumerate(lens):
        ids[b, n:] = 0  # padding: must not change the result
    targets = rng.integers(0, labels, B).astype(np.int32)
    return model, ids, lens, targets


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("name", ["lua", "gpt2", "llama", "llama-mqa-tied-bias"])
def test_classifier_loss_and_every_gradient_match_pytorch(rng, name, pool):
    model, ids, lens, labels = classifier_case(rng, name, pool)
    labels[2] = -1  # skipped, as the language model's IGNORE
    model.params.zero_grad()
    loss = model.classify_forward(ids, lens, labels)
    logits = model.acts.logits.copy()
    model.classify_backward()
    ref_weights = {t.name: torch.tensor(t.data, dtype=torch.float64, requires_grad=True)
                   for t in model.params}
    relu = [L["h"] for L in model.acts.layers] if model.arch.mlp == "relu" else None
    ref, ref_logits = reference_classify_loss(
        ref_weights, model.arch, torch.tensor(ids, dtype=torch.long), lens,
        torch.tensor(labels, dtype=torch.long), relu_signs=relu)
    ref.backward()
    assert abs(loss - ref.item()) / ref.item() < 1e-4
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    grads = {name: (w.grad.numpy() if w.grad is not None else np.zeros(w.shape))
             for name, w in ref_weights.items()}  # the language model's head: unused, 0
    total = np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    for t in model.params:
        expected = grads[t.name]
        err = np.linalg.norm(t.grad - expected) / max(np.linalg.norm(expected), 1e-3 * total)
        assert err < 1e-4, (t.name, err)
    # the padding positions get no gradient through the pooling
    assert model.params["cls_w"].grad.any() and model.params["cls_b"].grad.any()


def test_padding_changes_nothing(rng):
    model, ids, lens, labels = classifier_case(rng, "llama", "mean")
    model.classify_forward(ids, lens)
    first = model.acts.logits.copy()
    for b, n in enumerate(lens):
        ids[b, n:] = rng.integers(0, model.arch.n_vocab, ids.shape[1] - n)
    model.classify_forward(ids, lens)
    np.testing.assert_array_equal(model.acts.logits, first)


@pytest.mark.parametrize("call, message", [
    (lambda m, ids, lens: m.classify_forward(ids, lens * 0), "a length from 1"),
    (lambda m, ids, lens: m.classify_forward(ids, lens, [0, 1, 2, 3]), r"ids in \[0, 3\)"),
    (lambda m, ids, lens: m.classify_backward(), "needs a classify_forward"),
])
def test_bad_classifier_calls_are_one_line_errors(rng, call, message):
    model, ids, lens, _ = classifier_case(rng, "gpt2", "last")
    with pytest.raises(SqlgptError, match=message):
        call(model, ids, lens)


def test_a_language_model_has_no_classifier(rng):
    model = GPT(arch_of("gpt2"))
    with pytest.raises(SqlgptError, match="no classification head"):
        model.classify_forward(np.zeros((1, 4), np.int32), [4])


# ---- fine-tuning a classifier, and using it ----
import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402

from click.testing import CliRunner  # noqa: E402

import sqlgpt  # noqa: E402
from sqlgpt.cli import main  # noqa: E402

from conftest import CORPUS  # noqa: E402

WORDS = "the king queen lord lady house night day sword crown field river".split()
KEYS = {"pos": "joy", "neg": "woe", "neutral": "and"}  # the word that decides a row's label


def labelled_rows(n, seed):
    """(text, label) rows whose label is the one key word among filler words."""
    rand = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rand.choice(sorted(KEYS))
        words = rand.choices(WORDS, k=rand.randint(3, 10))
        words.insert(rand.randrange(len(words) + 1), KEYS[label])
        rows.append((" ".join(words), label))
    return rows


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A folder with a tiny base model, an app database of labelled rows,
    the same rows as CSV and JSON Lines, and a classifier trained from SQL."""
    folder = tmp_path_factory.mktemp("classify")
    (folder / "corpus.txt").write_text(CORPUS.read_text()[:60000])
    result = cli("train", folder / "corpus.txt", "--db", folder / "base.db", "--preset",
                 "llama", "--tokenizer", "char", "--embed-dim", "48", "--heads", "4",
                 "--layers", "2", "--seq-len", "48", "--batch-size", "8", "--iters", "40")
    assert result.exit_code == 0, result.output
    rows = labelled_rows(480, 0)
    app = sqlite3.connect(folder / "app.db")
    app.execute("CREATE TABLE reviews (id INTEGER PRIMARY KEY, body TEXT, label TEXT)")
    app.executemany("INSERT INTO reviews (body, label) VALUES (?, ?)", rows)
    app.commit()
    app.close()
    with open(folder / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    (folder / "reviews.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    before = (folder / "app.db").read_bytes()
    result = cli("train", "--task", "classify", "--base", folder / "base.db", "--sql",
                 "SELECT body, label FROM reviews", "--from", folder / "app.db", "--db",
                 folder / "clf.db", "--iters", "250", "--lr", "3e-3", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    assert (folder / "app.db").read_bytes() == before  # the app's file: only read
    return folder


def test_a_classifier_learns_from_sql_rows_and_records_its_scores(task):
    db = sqlite3.connect(task / "clf.db")
    assert db.execute("SELECT id, name FROM labels ORDER BY id").fetchall() == \
        [(0, "neg"), (1, "neutral"), (2, "pos")]
    step, accuracy, macro_f1, confusion, examples = db.execute(
        "SELECT step, accuracy, macro_f1, confusion, examples FROM classifier_evals "
        "ORDER BY step DESC LIMIT 1").fetchone()
    confusion = np.array(json.loads(confusion))
    assert step == 250 and examples == 48  # --val-fraction 0.1 of 480 held out
    assert confusion.sum() == examples and confusion.trace() / examples == pytest.approx(accuracy)
    assert accuracy >= 0.9 and macro_f1 >= 0.9  # chance is a third
    config = dict(db.execute("SELECT key, value FROM config"))
    assert config["num_labels"] == 3 and config["pool"] == "last"


def test_the_api_the_sql_functions_and_the_cli_give_the_same_labels(task):
    model = sqlgpt.load(task / "clf.db")
    texts = [t for t, _ in labelled_rows(20, 7)]
    truth = [l for _, l in labelled_rows(20, 7)]
    labels = model.classify(texts)
    assert np.mean([a == b for a, b in zip(labels, truth)]) >= 0.85
    scores = model.classify_scores(texts)
    assert all(abs(sum(s.values()) - 1) < 1e-9 and max(s, key=s.get) == l
               for s, l in zip(scores, labels))
    assert model.classify(texts[0]) == labels[0]
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, task / "clf.db")
    for text, label, score in zip(texts, labels, scores):
        got, as_json = conn.execute("SELECT sqlgpt_classify(?), sqlgpt_classify_scores(?)",
                                    (text, text)).fetchone()
        assert got == label and json.loads(as_json) == pytest.approx(score, abs=1e-5)
    result = cli("classify", "--db", task / "clf.db", *texts[:3])
    assert result.exit_code == 0
    assert result.output.splitlines() == [f"{l}\t{t}" for t, l in zip(texts[:3], labels[:3])]
    result = cli("classify", "--db", task / "clf.db", "--sql",
                 "SELECT body FROM reviews LIMIT 4", "--from", task / "app.db", "--json")
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["label"] for r in rows] == model.classify([r["text"] for r in rows])


def test_files_give_the_classifier_a_query_gives(task):
    for name in ("reviews.csv", "reviews.jsonl"):
        out = task / f"{name}.db"
        result = cli("train", "--task", "classify", "--base", task / "base.db", task / name,
                     "--db", out, "--iters", "250", "--lr", "3e-3", "--batch-size", "16")
        assert result.exit_code == 0, result.output
        ours, theirs = sqlgpt.load(out).state_dict(), sqlgpt.load(task / "clf.db").state_dict()
        assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_a_lora_classifier_with_mean_pooling_learns_and_leaves_its_base(task):
    base = (task / "base.db").read_bytes()
    result = cli("finetune", "--task", "classify", "--base", task / "base.db",
                 task / "reviews.jsonl", "--db", task / "lora.db", "--pool", "mean",
                 "--iters", "200", "--lr", "1e-2", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    assert (task / "base.db").read_bytes() == base
    model = sqlgpt.load(task / "lora.db")
    assert model.lora is not None and model.arch.pool == "mean"
    rows = labelled_rows(60, 3)
    accuracy = np.mean([a == l for a, (_, l) in zip(model.classify([t for t, _ in rows]), rows)])
    assert accuracy >= 0.7  # chance is a third


@pytest.mark.parametrize("make, args, message", [
    (lambda f: None, ["--sql", "SELECT body FROM reviews"], "two columns"),
    (lambda f: None, ["--sql", "SELECT body, NULL FROM reviews"], "row 1 of the --sql query: "
                                                                  "its label is empty"),
    (lambda f: None, ["--sql", "SELECT body, 'one' FROM reviews"], "at least two labels"),
    (lambda f: (f / "bad.csv").write_text("words,tag\na,b\n"), ["bad.csv"], "header row"),
    (lambda f: (f / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n[1]\n'),
     ["bad.jsonl"], "bad.jsonl line 2: not an object"),
    (lambda f: (f / "bad.jsonl").write_text('{"text": "", "label": "x"}\n'),
     ["bad.jsonl"], "line 1: no text"),
    (lambda f: None, ["reviews.txt"], "a .csv file"),
])
def test_bad_labelled_data_is_a_one_line_error(task, make, args, message):
    make(task)
    args = [task / a if a.endswith(("csv", "jsonl", "txt")) else a for a in args]
    if "--sql" in args:
        args += ["--from", task / "app.db"]
    result = cli("train", "--task", "classify", "--base", task / "base.db", *args, "--db",
                 task / "bad.db", "--iters", "2")
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (task / "bad.db").exists()


def test_what_a_classifier_refuses(task):
    result = cli("train", "--task", "classify", "--db", task / "clf.db", "--resume",
                 "--iters", "200")
    assert result.exit_code == 1 and "cannot --resume yet" in result.output
    result = cli("train", "--task", "classify", "--base", task / "clf.db", task / "reviews.csv",
                 "--db", task / "again.db")
    assert result.exit_code == 1 and "is a classifier already" in result.output
    result = cli("export", "--db", task / "clf.db", "--format", "gguf", "-o", task / "c.gguf")
    assert result.exit_code == 1 and "is a classifier" in result.output
    result = cli("classify", "--db", task / "base.db", "some text")
    assert result.exit_code == 1 and "not a classifier" in result.output
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, task / "clf.db")
    for bad in (None, "", 3):
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("SELECT sqlgpt_classify(?)", (bad,)).fetchone()
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, task / "base.db")
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("SELECT sqlgpt_classify('a text')").fetchone()
    assert "not a classifier" in conn.execute("SELECT sqlgpt_error()").fetchone()[0]


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 shell")
def test_the_extension_gives_the_labels_and_scores_python_gives(task):
    try:
        ext = sqlgpt.extension_path()
    except SqlgptError:
        pytest.skip("the extension is not built")
    model = sqlgpt.load(task / "clf.db")
    texts = [t for t, _ in labelled_rows(8, 11)]
    for text in texts:
        quoted = text.replace("'", "''")
        out = subprocess.run(["sqlite3", str(task / "clf.db"), f".load {ext[:-3]}",
                              f"SELECT sqlgpt_classify('{quoted}'), "
                              f"sqlgpt_classify_scores('{quoted}');"],
                             capture_output=True, text=True, timeout=60)
        label, scores = out.stdout.strip().split("|", 1)
        assert label == model.classify(text)
        assert json.loads(scores) == pytest.approx(model.classify_scores(text), abs=1e-5)
    for sql, message in (("SELECT sqlgpt_classify(NULL)", "text is NULL"),
                         ("SELECT sqlgpt_classify('')", "non-empty text")):
        out = subprocess.run(["sqlite3", str(task / "clf.db"), f".load {ext[:-3]}", sql],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and message in out.stderr
    out = subprocess.run(["sqlite3", str(task / "base.db"), f".load {ext[:-3]}",
                          "SELECT sqlgpt_classify('a text')"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "not a classifier" in out.stderr
