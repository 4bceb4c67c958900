"""Every preset and part through the command line: train, resume, generate
(float32 and bf16), info and check; impossible architectures are one-line
errors that write nothing."""
import json

import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main

from conftest import TINY


BPE_SIZE = ["--vocab-size", "300"]  # TINY's 100 is below a BPE's 260 specials and bytes; a
                                   # word model keeps the corpus's few hundred words


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("options,expected", [
    (["--preset", "gpt2"], dict(norm="layernorm", mlp="gelu", bias=True, tie_weights=True)),
    (["--preset", "gpt2", "--no-bias"], dict(bias=False, tie_weights=True)),
    (["--preset", "llama", "--kv-heads", "2"], dict(norm="rmsnorm", pos="rope", mlp="swiglu",
                                                   kv_heads=2, tie_weights=False)),
    (["--preset", "llama", "--tie-weights", "--pos", "sinusoidal", "--mlp", "gelu",
      "--ffn-dim", "48", "--rope-theta", "500"], dict(tie_weights=True, pos="sinusoidal",
                                                      ffn_dim=48, rope_theta=500.0)),
    (["--norm", "rmsnorm", "--norm-affine", "--pos", "none", "--final-norm", "--bias",
      "--norm-eps", "1e-6"], dict(preset="lua", norm="rmsnorm", norm_affine=True, pos="none",
                                  final_norm=True, bias=True, norm_eps=1e-6)),
], ids=["gpt2", "gpt2-no-bias", "llama-gqa", "llama-mixed", "lua-mixed"])
def test_train_resume_generate_info_check(tmp_path, small_corpus, options, expected):
    db = tmp_path / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 4, "--save-every", 2, *TINY,
                 *options, *BPE_SIZE)
    assert result.exit_code == 0, result.output
    stored = sqlgpt.load(db).config
    assert {k: stored[k] for k in expected} == expected
    result = run("train", small_corpus, "--db", db, "--iters", 6, "--resume")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(db).step == 6
    for precision in ("fp32", "bf16"):
        result = run("generate", "--db", db, "--prompt", "the citizen", "--max-tokens", 5,
                     "--temperature", 0, "--precision", precision)
        assert result.exit_code == 0 and result.output.startswith("the citizen"), result.output
        if stored["tokenizer"] == "word":
            assert len(result.output.split()) == 7
        else:
            assert len(result.output) > len("the citizen\n")
    info = json.loads(run("info", "--db", db, "--json").output.strip().splitlines()[-1])
    assert info["config"]["preset"] == stored["preset"] and info["step"] == 6
    assert run("check", "--db", db).exit_code == 0


def test_state_dict_names_follow_the_tensor_table(tmp_path, small_corpus):
    from sqlgpt.model.arch import stored_tensors
    db = tmp_path / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 1, *TINY, "--preset", "llama",
                 "--kv-heads", "2", *BPE_SIZE)
    assert result.exit_code == 0, result.output
    model = sqlgpt.load(db)
    weights = model.state_dict()
    assert list(weights) == [s.name for s in stored_tensors(model.arch)]
    assert weights["layers.0.k"].shape == (32, 16) and weights["layers.1.ln2_w"].shape == (32,)
    assert "head" in weights and "wpe" not in weights


@pytest.mark.parametrize("options,message", [
    (["--kv-heads", "3"], "kv_heads"),
    (["--preset", "llama", "--embed-dim", "36", "--heads", "12"], "even head size"),
    (["--pos", "sinusoidal", "--embed-dim", "33", "--heads", "3"], "even embed_dim"),
    (["--heads", "5"], "must divide embed_dim"),
    (["--norm-eps", "0"], "norm_eps"),
    (["--rope-theta", "nan"], "rope_theta"),
    (["--ffn-dim", "-4"], "ffn_dim"),
    (["--mlp", "geglu"], "geglu"),
])
def test_impossible_architectures_are_one_line_errors(tmp_path, small_corpus, options, message):
    db = tmp_path / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 1, *TINY, *options)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not db.exists()


def test_resume_refuses_architecture_options(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 1, *TINY).exit_code == 0
    result = run("train", small_corpus, "--db", db, "--iters", 2, "--resume", "--mlp", "gelu")
    assert result.exit_code != 0 and "--mlp" in result.output
