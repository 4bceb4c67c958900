"""Fuzzed foreign input: a stored tokenizer's state (bpe and hf), a Hugging
Face directory's config.json and a safetensors header. Every case ends in a
clean SqlgptError or a working model: never another exception, a crash or
a hang (the suite also runs under the sanitizers)."""
import json
import shutil
import sqlite3

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.data.tokenizers.hf import HFTokenizer
from sqlgpt.errors import SqlgptError
from sqlgpt.interop.hf import read_hf

from conftest import CORPUS
from helpers import byte_level_bpe

FUZZ = settings(max_examples=150, deadline=5000, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TEXT = CORPUS.read_text()[:20000]
# JSON values as a fuzzer writes them: scalars, odd numbers, nesting
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def bpe_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "bpe.db"
    corpus = db.parent / "c.txt"
    corpus.write_text(TEXT)
    assert run("train", corpus, "--db", db, "--preset", "gpt2", "--iters", 1, "--embed-dim",
               32, "--heads", 4, "--layers", 1, "--seq-len", 16, "--batch-size", 2,
               "--vocab-size", 300).exit_code == 0  # gpt2: it exports exactly
    return db


@pytest.fixture(scope="module")
def exported(bpe_db):
    out = bpe_db.parent / "hf"
    assert run("export", "--db", bpe_db, "-o", out).exit_code == 0
    return out


@FUZZ
@given(key=st.sampled_from(["merges", "pattern", "kind", "missing"]),
       value=JSON.map(json.dumps) | st.text(max_size=40))
def test_fuzzed_bpe_state_loads_or_is_refused(bpe_db, tmp_path_factory, key, value):
    db = tmp_path_factory.mktemp("state") / "m.db"
    shutil.copy(bpe_db, db)
    conn = sqlite3.connect(db)
    if key == "missing":
        conn.execute("DELETE FROM tokenizer WHERE key = 'merges'")
    else:
        conn.execute("UPDATE tokenizer SET value = ? WHERE key = ?", (value, key))
    conn.commit()
    conn.close()
    try:
        model = sqlgpt.load(db)
    except SqlgptError:
        return
    model.generate("the", max_tokens=2, seed=1)


@FUZZ
@given(part=st.sampled_from(["normalizer", "pre_tokenizer", "decoder", "model", "padding",
                             "added_tokens"]), value=JSON)
def test_fuzzed_hf_tokenizer_definitions_load_or_are_refused(part, value):
    definition = json.loads(byte_level_bpe(TEXT[:3000], 280).to_str())
    definition[part] = value
    try:
        tok = HFTokenizer(json.dumps(definition), {})
    except SqlgptError:
        return
    tok.decode(tok.encode("the king, 123"))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(
    ["model_type", "n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "n_inner",
     "activation_function", "tie_word_embeddings", "layer_norm_epsilon"]), JSON, max_size=3))
def test_fuzzed_configs_import_or_are_refused(exported, tmp_path_factory, changes):
    out = tmp_path_factory.mktemp("cfg") / "hf"
    shutil.copytree(exported, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    try:
        read_hf(out)
    except SqlgptError:
        pass


@FUZZ
@given(header=JSON.map(json.dumps) | st.binary(max_size=64), tail=st.binary(max_size=64))
def test_fuzzed_safetensors_headers_are_refused_or_read(exported, tmp_path_factory, header,
                                                        tail):
    out = tmp_path_factory.mktemp("st") / "hf"
    shutil.copytree(exported, out)
    raw = header.encode() if isinstance(header, str) else header
    (out / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + tail)
    with pytest.raises(SqlgptError):  # nothing fuzzed here holds the model's tensors
        read_hf(out)
