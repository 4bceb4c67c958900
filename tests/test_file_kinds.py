"""Every kind of file sqlgpt writes, through both loaders: the Python loader
(sqlgpt.load, via sqlgpt.register) and the loadable extension (sqlgpt0.so)
read the same model from it, giving the same greedy and seeded text and
log-probabilities within 1e-5; a kind the extension cannot serve is one SQL
error that says what to do. The extension's loader is generated from the
same contract (sqlgpt/contract.py) as Python's, so a new kind of file that
loads in one and not the other fails here."""
import gzip
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from sqlgpt.cli import main

from conftest import CORPUS
from test_extension import EXT, client, through_python

pytestmark = pytest.mark.skipif(EXT is None, reason="the extension is not built")
DATA = Path(__file__).resolve().parent / "data"
SIZE = ["--embed-dim", "32", "--heads", "4", "--layers", "2", "--seq-len", "24",
        "--batch-size", "4", "--iters", "8", "--save-every", "8"]
QUERIES = ["SELECT sqlgpt_generate('the king', 20, 0)",
           "SELECT sqlgpt_generate('the', 16, 0.9, 5)",
           "SELECT sqlgpt_logprob('the king is dead')",
           "SELECT sqlgpt_tokens('the king')"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "corpus.txt"
    path.write_text(CORPUS.read_text()[:30000])
    return path


def trained(corpus, name, *options):
    db = corpus.parent / f"{name}.db"
    if not db.exists():
        run("train", corpus, "--db", db, *options, *SIZE)
    return db


def old_file(corpus, version):
    db = corpus.parent / f"v{version}.db"
    if not db.exists():
        db.write_bytes(gzip.decompress((DATA / f"v{version}_model.db.gz").read_bytes()))
    return db


DB = object()  # where made() puts the file it names


def made(corpus, name, *args):
    """The file name beside the corpus, made once by the command args (DB
    standing for its path)."""
    db = corpus.parent / name
    if not db.exists():
        run(*(db if a is DB else a for a in args))
    return db


# kind -> (a function of the corpus giving (db, precision, prefix))
def _fresh(c):
    return trained(c, "gpt2", "--preset", "gpt2", "--tokenizer", "char"), "fp32", ""


def _resumed(c):
    db = c.parent / "resumed.db"
    if not db.exists():
        shutil.copy(trained(c, "llama", "--preset", "llama", "--kv-heads", "2",
                            "--vocab-size", "300"), db)
        shutil.copy(f"{c.parent / 'llama.db'}.tokens", f"{db}.tokens")
        run("train", "--db", db, "--resume", "--iters", "12")
    return db, "fp32", ""


def _compacted(c):
    return made(c, "compacted.db", "compact", "--db", _fresh(c)[0], "-o", DB), "fp32", ""


def _lora(c):
    return made(c, "lora.db", "finetune", "--base", _fresh(c)[0], c, "--db", DB, "--iters", "4",
                "--batch-size", "4"), "fp32", ""


def _merged(c):
    return made(c, "merged.db", "merge", "--db", _lora(c)[0], "-o", DB), "fp32", ""


def _prefixed(c):
    db = c.parent / "app.db"
    if not db.exists():
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
        conn.close()
        run("train", c, "--db", db, "--prefix", "gpt_", "--preset", "lua", *SIZE)
    return db, "fp32", "gpt_"


def _quantized(bits):
    def make(c):
        db = c.parent / f"int{bits}.db"
        if not db.exists():
            run("compact", "--db", trained(c, "bpe", "--preset", "llama", "--vocab-size", "300"),
                "-o", db)
            run("quantize", "--db", db, "--bits", str(bits))
        return db, f"int{bits}", ""
    return make


def _qwen2(c):
    return trained(c, "qwen2", "--preset", "llama", "--qkv-bias", "--kv-heads", "2",
                   "--tokenizer", "byte"), "fp32", ""


def _tied_gqa(c):
    return trained(c, "tied", "--preset", "llama", "--tie-weights", "--kv-heads", "1",
                   "--tokenizer", "byte", "--pos", "sinusoidal"), "fp32", ""


def _migrated(version):
    def make(c):
        return made(c, f"migrated{version}.db", "compact", "--db", old_file(c, version), "-o",
                    DB), "fp32", ""
    return make


def _as_written(version):
    def make(c):
        return old_file(c, version), "fp32", ""
    return make


def _imported(c):
    db, out = c.parent / "imported.db", c.parent / "hf"
    if not db.exists():
        run("export", "--db", trained(c, "bpe", "--preset", "llama", "--vocab-size", "300"),
            "--format", "hf", "-o", out)
        run("import", out, "--db", db)
    return db, "fp32", ""


SERVED = {"fresh": _fresh, "resumed": _resumed, "compacted": _compacted, "merged": _merged,
          "prefixed": _prefixed, "int8": _quantized(8), "int4": _quantized(4),
          "qkv-bias": _qwen2, "tied-gqa-sinusoidal": _tied_gqa, "imported": _imported,
          "migrated-v1": _migrated(1), "migrated-v2": _migrated(2), "migrated-v3": _migrated(3),
          "v2-as-written": _as_written(2), "v3-as-written": _as_written(3)}
# kind -> (maker, what the extension's error says to do)
REFUSED = {"lora": (_lora, "sqlgpt merge"),
           "v1-as-written": (_as_written(1), "resume or compact it with sqlgpt")}


@pytest.mark.parametrize("kind", list(SERVED))
def test_both_loaders_read_the_same_model(corpus, kind):
    db, precision, prefix = SERVED[kind](corpus)
    before = db.read_bytes()
    setup = [f"SELECT sqlgpt_model('main', '{precision}', '{prefix}')"]
    ours, = client([{"db": str(db), "setup": setup, "queries": QUERIES}])
    theirs = through_python(db, QUERIES, precision, prefix)
    assert all(not isinstance(v, dict) for v in theirs), theirs
    assert ours[:2] == theirs[:2] and ours[3] == theirs[3], (ours, theirs)
    assert abs(ours[2] - theirs[2]) <= 1e-5 * max(1.0, abs(theirs[2])), (ours[2], theirs[2])
    assert db.read_bytes() == before  # both only read


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_kind_the_extension_cannot_serve_says_what_to_do(corpus, kind):
    maker, advice = REFUSED[kind]
    db, _, _ = maker(corpus)
    ours, = client([{"db": str(db), "queries": QUERIES[:1]}])
    assert isinstance(ours[0], dict) and advice in ours[0]["error"], ours
    assert "\n" not in ours[0]["error"]
    assert isinstance(through_python(db, QUERIES[:1])[0], str)  # Python serves it
