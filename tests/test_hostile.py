"""Hostile files: a tokenizer.json that would pad every encoding to a
trillion ids or split by a pattern that makes encoding quadratic, and a
config that claims gigabytes of weights in a small file. Each is a one-line
error (or made harmless) before any of it can take the host down, in the
Python loader and in the extension alike."""
import json
import shutil
import sqlite3
import time

import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.data.tokenizers.hf import HFTokenizer, known_shape
from sqlgpt.errors import SqlgptError

from conftest import CORPUS
from helpers import byte_level_bpe, slowdown
from test_extension import EXT, client

TEXT = CORPUS.read_text()[:20000]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def definition():
    """A byte-level BPE tokenizer.json (GPT-2's kind) as a dict."""
    return json.loads(byte_level_bpe(TEXT, 300).to_str())


def with_split(definition, pattern):
    return {**definition, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}}


def test_padding_and_truncation_are_dropped(definition):
    padded = {**definition, "padding": {"strategy": {"Fixed": 10**12}, "direction": "Right",
                                        "pad_to_multiple_of": None, "pad_id": 0,
                                        "pad_type_id": 0, "pad_token": "!"},
              "truncation": {"direction": "Right", "max_length": 1, "strategy": "LongestFirst",
                             "stride": 0}}
    tok = HFTokenizer(json.dumps(padded), {})
    assert len(tok.encode("hi there")) == len(HFTokenizer(json.dumps(definition),
                                                          {}).encode("hi there")) > 1
    assert json.loads(tok.state()["tokenizer_json"])["padding"] is None


def test_a_pattern_sqlgpt_does_not_know_is_refused(definition):
    for pattern in (r".(?=.*QQQ)|.", r"(a+)+$| ?[^ ]+"):
        with pytest.raises(SqlgptError, match="splits by a pattern sqlgpt does not know"):
            HFTokenizer(json.dumps(with_split(definition, pattern)), {})


def test_the_real_models_patterns_run_in_linear_time(definition):
    from sqlgpt.contract import PRETOKENIZER_PATTERNS
    tok = HFTokenizer(json.dumps(with_split(definition, PRETOKENIZER_PATTERNS["llama-3"])), {})
    text = ("word " * 40000)[:200000]
    start = time.perf_counter()
    assert len(tok.encode(text)) > 1000
    assert time.perf_counter() - start < 10  # a quadratic pattern takes minutes here


@pytest.mark.parametrize("change,message", [
    ({"normalizer": {"type": "Replace", "pattern": {"Regex": "(a+)+"}, "content": ""}},
     "normalizer Replace"),
    ({"decoder": {"type": "WordPiece"}}, "decoder WordPiece"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "does not end in ByteLevel"),
    ({"model": {"type": "WordLevel", "vocab": {"a": 0}}}, "only BPE tokenizers import"),
])
def test_other_shapes_are_one_line_errors(definition, change, message):
    with pytest.raises(SqlgptError, match=message):
        known_shape(json.dumps({**definition, **change}))


def test_a_deeply_nested_tokenizer_json_is_an_error():
    nested = "[" * 100000 + "]" * 100000
    with pytest.raises(SqlgptError, match="not valid JSON|not a tokenizer"):
        known_shape(nested)
    deep = 1
    for _ in range(100):  # JSON a parser reads, nested past any tokenizer's depth
        deep = [deep]
    with pytest.raises(SqlgptError, match="nested deeper than 64"):
        known_shape(json.dumps({"model": {"type": "BPE", "x": deep}}))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    db = tmp_path_factory.mktemp("hostile") / "m.db"
    corpus = db.parent / "c.txt"
    corpus.write_text(TEXT)
    result = run("train", corpus, "--db", db, "--iters", 2, "--embed-dim", 32, "--heads", 4,
                 "--layers", 2, "--seq-len", 16, "--batch-size", 4, "--tokenizer", "char")
    assert result.exit_code == 0, result.output
    return db


@pytest.mark.parametrize("key,value", [("embed_dim", 1024), ("seq_len", 65536),
                                       ("num_layers", 1024)])
def test_a_config_claiming_more_than_the_file_holds_is_refused_before_allocating(
        small_model, tmp_path, key, value):
    db = tmp_path / "claims.db"
    shutil.copy(small_model, db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE config SET value = ? WHERE key = ?", (value, key))
    if key == "seq_len":
        conn.execute("UPDATE config SET value = 'sinusoidal' WHERE key = 'pos'")
        conn.execute("UPDATE config SET value = 1024 WHERE key = 'embed_dim'")
    conn.commit()
    conn.close()
    with pytest.raises(SqlgptError, match="more than the .* file holds"):
        sqlgpt.load(db)
    result = run("generate", "--db", db, "--max-tokens", 3)
    assert result.exit_code == 1 and "file holds" in result.output
    if EXT is not None:
        ours, = client([{"db": str(db), "queries": ["SELECT sqlgpt_generate('a', 3, 0)"]}])
        assert "file holds" in ours[0]["error"]


@pytest.mark.parametrize("record", [
    [1], "x", {"file": "../../etc/passwd", "dtype": "<u2", "count": 1, "bytes": 2,
                "sha256": "0" * 64},
    {"file": "/etc/hosts", "dtype": "<u2", "count": 1, "bytes": 2, "sha256": "0" * 64},
    {"file": "m.db.tokens", "dtype": "object", "count": 1, "bytes": 2, "sha256": "0" * 64},
    {"file": "m.db.tokens", "dtype": "<u2", "count": True, "bytes": 2, "sha256": "0" * 64},
])
def test_a_token_file_record_outside_the_database_or_garbled_is_refused(small_model, tmp_path,
                                                                         record):
    db = tmp_path / "m.db"
    shutil.copy(small_model, db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE train_state SET value = ? WHERE key = 'tokens'", (json.dumps(record),))
    conn.commit()
    conn.close()
    before = db.read_bytes()
    result = run("train", "--db", db, "--iters", 5, "--resume")
    assert result.exit_code == 1 and "token file's record" in result.output, result.output
    assert "Traceback" not in result.output and db.read_bytes() == before


def test_sqlgpt_error_is_each_threads_own(small_model):
    import threading
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    sqlgpt.register(conn, small_model)
    seen = {}

    def fail_then_read(name, sql):
        with pytest.raises(sqlite3.Error):
            conn.execute(sql).fetchone()
        barrier.wait()  # both have failed before either reads
        seen[name] = conn.execute("SELECT sqlgpt_error()").fetchone()[0]
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=fail_then_read, args=(name, sql)) for name, sql in (
        ("generate", "SELECT sqlgpt_generate('a', -5)"), ("embed", "SELECT sqlgpt_embed('')"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["generate"].startswith("sqlgpt_generate") and \
        seen["embed"].startswith("sqlgpt_embed")


@pytest.fixture(scope="module")
def exported(small_model, tmp_path_factory):
    """A transformers directory (gpt2 preset, BPE) to damage."""
    corpus = small_model.parent / "c.txt"
    db = tmp_path_factory.mktemp("hf") / "gpt2.db"
    assert run("train", corpus, "--db", db, "--preset", "gpt2", "--iters", 1, "--embed-dim", 32,
               "--heads", 4, "--layers", 1, "--seq-len", 16, "--batch-size", 2,
               "--vocab-size", 300).exit_code == 0
    out = db.parent / "hf"
    assert run("export", "--db", db, "-o", out).exit_code == 0
    return out


def damaged_copy(exported, tmp_path, name, text):
    out = tmp_path / "hf"
    shutil.copytree(exported, out)
    (out / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return out


@pytest.mark.parametrize("name,text,message", [
    ("config.json", '{"model_type": "gpt2", "n_embd": Infinity}', "not valid JSON"),
    ("config.json", '{"model_type": "gpt2", "n_embd": 1e999}', "not valid JSON"),
    ("config.json", '{"a": ' * 5000 + "1" + "}" * 5000, "not valid JSON"),
    ("config.json", '{"model_type": "gpt2", "n_embd": 1e300, "n_head": 4, "n_layer": 1, '
                    '"n_positions": 16, "vocab_size": 300}', "embed_dim must be"),
])
def test_hostile_hugging_face_configs_are_one_line_errors(exported, tmp_path, name, text,
                                                          message):
    out = damaged_copy(exported, tmp_path, name, text)
    result = run("import", out, "--db", tmp_path / "x.db")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.db").exists()


def safetensors_with(header, data=b""):
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("header,data,message", [
    ('{"w": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', b"\0" * 4, "0 dimensions"),
    ('{"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776, 0], '
     '"data_offsets": [0, 0]}}', b"", "3 dimensions"),
    ('{"w": ' * 3000 + "1" + "}" * 3000, b"", "corrupt safetensors header"),
])
def test_hostile_safetensors_headers_are_one_line_errors(exported, tmp_path, header, data,
                                                         message):
    out = damaged_copy(exported, tmp_path, "model.safetensors", safetensors_with(header, data))
    result = run("import", out, "--db", tmp_path / "x.db")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_bpe_merges_nested_deep_in_a_database_are_a_one_line_error(tmp_path, small_model):
    db = tmp_path / "bpe.db"
    corpus = small_model.parent / "c.txt"
    assert run("train", corpus, "--db", db, "--iters", 1, "--embed-dim", 32, "--heads", 4,
               "--layers", 1, "--seq-len", 16, "--batch-size", 2, "--tokenizer", "bpe",
               "--vocab-size", 300).exit_code == 0
    conn = sqlite3.connect(db)
    conn.execute("UPDATE tokenizer SET value = ? WHERE key = 'merges'",
                 ("[" * 200000 + "]" * 200000,))
    conn.commit()
    conn.close()
    with pytest.raises(SqlgptError, match="damaged"):
        sqlgpt.load(db)
    result = run("generate", "--db", db, "--max-tokens", 2)
    assert result.exit_code == 1 and "Traceback" not in result.output


@pytest.fixture(scope="module")
def wide_model(small_model):
    """A model wide enough that 4,096 tokens take seconds to generate."""
    db = small_model.parent / "wide.db"
    assert run("train", small_model.parent / "c.txt", "--db", db, "--iters", 1, "--embed-dim",
               512, "--heads", 8, "--layers", 6, "--seq-len", 256, "--batch-size", 1,
               "--tokenizer", "char").exit_code == 0
    return db


@pytest.mark.parametrize("query", ["SELECT sqlgpt_logprob(?)", "SELECT sqlgpt_embed(?)",
                                   "SELECT sqlgpt_generate('a', 4096, 1.0, 1)"])
def test_long_python_sql_calls_stop_when_the_host_interrupts(wide_model, query):
    import threading
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    sqlgpt.register(conn, wide_model)
    text = (TEXT * 50)[:1_000_000]
    threading.Timer(0.3, conn.interrupt).start()
    start = time.perf_counter()
    with pytest.raises(sqlite3.Error):
        conn.execute(query, (text,) if "?" in query else ()).fetchone()
    elapsed = time.perf_counter() - start
    assert conn.execute("SELECT sqlgpt_error()").fetchone()[0].endswith("interrupted")
    assert elapsed < 3 * slowdown(), elapsed  # uninterrupted, each takes far longer
    assert conn.execute("SELECT sqlgpt_tokens('ab')").fetchone()[0]  # and the host goes on


@pytest.mark.parametrize("files,expected", [
    ({"cpu.max": "max 100000\n"}, None), ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "150000 100000\n"}, 2), ({"cpu/cpu.cfs_quota_us": "-1",
                                           "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),
    ({"cpu.max": "garbage"}, None), ({}, None),
])
def test_the_default_threads_keep_within_affinity_and_the_cgroup_quota(tmp_path, files,
                                                                      expected):
    import os
    from sqlgpt.model.cpus import usable_cpus
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    allowed = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (allowed if expected is None else min(allowed, expected))
