"""GGUF export, read back with the gguf package's own reader: llama.cpp's
metadata keys with their values and types, the tokenizer, and every
tensor's name, shape and values as llama.cpp's converter lays them out."""
import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main

from conftest import CORPUS

gguf = pytest.importorskip("gguf")

TINY = ["--embed-dim", "32", "--heads", "4", "--layers", "2", "--seq-len", "32",
        "--batch-size", "4", "--vocab-size", "300", "--iters", "4"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "corpus.txt"
    path.write_text(CORPUS.read_text()[:30000])
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, corpus):
    db = corpus.parent / f"{request.param}.db"
    extra = ["--kv-heads", "2"] if request.param == "llama" else []
    assert run("train", corpus, "--db", db, "--preset", request.param, *extra, *TINY
               ).exit_code == 0
    return db


def interleaved(w, heads):
    """rotate_half's rows (h, j * hs/2 + i) -> llama.cpp's (h, 2 i + j)."""
    hs = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(hs // 2):
            for j in range(2):
                out[h * hs + 2 * i + j] = w[h * hs + j * hs // 2 + i]
    return out


def expected_tensors(model):
    """llama.cpp's tensors of model, (out, in), written out by hand."""
    w, a = model.state_dict(), model.arch
    out = {"token_embd.weight": w["wte"], "output_norm.weight": w["lnf_w"]}
    for n in range(a.num_layers):
        L = lambda c: w[f"layers.{n}.{c}"]  # noqa: E731
        b = f"blk.{n}."
        if a.preset == "llama":
            out.update({b + "attn_norm.weight": L("ln1_w"), b + "ffn_norm.weight": L("ln2_w"),
                        b + "attn_q.weight": interleaved(L("q").T, a.num_heads),
                        b + "attn_k.weight": interleaved(L("k").T, a.n_kv_heads),
                        b + "attn_v.weight": L("v").T, b + "attn_output.weight": L("proj").T,
                        b + "ffn_gate.weight": L("gate").T, b + "ffn_up.weight": L("fc1").T,
                        b + "ffn_down.weight": L("fc2").T})
        else:
            out.update({b + "attn_norm.weight": L("ln1_w"), b + "attn_norm.bias": L("ln1_b"),
                        b + "ffn_norm.weight": L("ln2_w"), b + "ffn_norm.bias": L("ln2_b"),
                        b + "attn_qkv.weight": np.concatenate([L("q"), L("k"), L("v")], 1).T,
                        b + "attn_qkv.bias": np.concatenate([L("q_b"), L("k_b"), L("v_b")]),
                        b + "attn_output.weight": L("proj").T, b + "attn_output.bias": L("proj_b"),
                        b + "ffn_up.weight": L("fc1").T, b + "ffn_up.bias": L("fc1_b"),
                        b + "ffn_down.weight": L("fc2").T, b + "ffn_down.bias": L("fc2_b")})
    if a.preset == "gpt2":  # tied: llama.cpp's gpt2 reads its own copy of wte
        out.update({"position_embd.weight": w["wpe"], "output_norm.bias": w["lnf_b"],
                    "output.weight": w["wte"]})
    else:
        out["output.weight"] = w["head"].T  # llama's head is untied
    return out


def field(reader, key):
    f = reader.fields[key]
    return f.contents(), [t.name for t in f.types]


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_the_gguf_file_holds_llama_cpps_keys_and_tensors(trained, tmp_path, dtype):
    path = tmp_path / "model.gguf"
    result = run("export", "--db", trained, "--format", "gguf", "--dtype", dtype, "-o", path)
    assert result.exit_code == 0, result.output
    model = sqlgpt.load(trained)
    a, kind = model.arch, model.arch.preset
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == (kind, ["STRING"])
    for key, value in (("context_length", a.seq_len), ("embedding_length", a.embed_dim),
                       ("block_count", a.num_layers), ("feed_forward_length", a.hidden_dim),
                       ("attention.head_count", a.num_heads)):
        assert field(reader, f"{kind}.{key}") == (value, ["UINT32"])
    if kind == "llama":
        assert field(reader, "llama.attention.head_count_kv") == (2, ["UINT32"])
        assert field(reader, "llama.rope.dimension_count") == (a.head_dim, ["UINT32"])
        assert field(reader, "llama.rope.freq_base") == (a.rope_theta, ["FLOAT32"])
        eps, types = field(reader, "llama.attention.layer_norm_rms_epsilon")
        assert types == ["FLOAT32"] and eps == pytest.approx(a.norm_eps)
    else:
        assert field(reader, "gpt2.attention.layer_norm_epsilon")[0] == pytest.approx(a.norm_eps)
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    assert field(reader, "general.file_type") == (file_type, ["UINT32"])
    tokens, types = field(reader, "tokenizer.ggml.tokens")
    assert types == ["ARRAY", "STRING"] and len(tokens) == a.n_vocab
    assert tokens[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert field(reader, "tokenizer.ggml.model") == ("gpt2", ["STRING"])
    assert field(reader, "tokenizer.ggml.eos_token_id") == (3, ["UINT32"])
    assert field(reader, "tokenizer.ggml.bos_token_id") == (2, ["UINT32"])
    merges, _ = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(model.tokenizer.merges)
    left, right = model.tokenizer.merges[0]
    assert merges[0] == f"{tokens[left]} {tokens[right]}"
    assert field(reader, "tokenizer.ggml.token_type")[0][:5] == [3, 3, 3, 3, 1]
    expected = expected_tensors(model)
    found = {t.name: t for t in reader.tensors}
    assert set(found) == set(expected)
    for name, want in expected.items():
        t = found[name]
        assert list(t.shape) == list(reversed(want.shape))  # ggml's ne: innermost first
        if want.ndim == 1 or dtype == "f32":
            assert t.tensor_type.name == "F32"
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name
        elif dtype == "f16":
            assert t.tensor_type.name == "F16"
            assert np.array_equal(np.asarray(t.data).reshape(want.shape),
                                  want.astype(np.float16)), name
        else:
            assert t.tensor_type.name == "Q8_0"
            back = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0)
            step = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=2) / 127
            err = np.abs(back.reshape(want.shape) - want).reshape(want.shape[0], -1, 32)
            # half a step, plus the float16 rounding of Q8_0's scale (times up to 127)
            assert (err <= step[..., None] * 0.6 + 1e-6).all(), name


def test_what_gguf_cannot_hold_is_refused(corpus, tmp_path, trained):
    char = tmp_path / "char.db"
    assert run("train", corpus, "--db", char, "--preset", "gpt2", "--tokenizer", "char",
               *TINY[:-4], "--iters", "1").exit_code == 0
    result = run("export", "--db", char, "--format", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 1 and "needs a byte-level BPE tokenizer" in result.output
    assert not (tmp_path / "x.gguf").exists()
    relu = tmp_path / "relu.db"
    assert run("train", corpus, "--db", relu, "--preset", "gpt2", "--mlp", "relu", *TINY[:-2],
               "--iters", "1").exit_code == 0
    result = run("export", "--db", relu, "--format", "gguf", "-o", tmp_path / "r.gguf")
    assert result.exit_code == 1 and "always uses GELU" in result.output
    (tmp_path / "taken.gguf").write_text("x")
    result = run("export", "--db", trained, "--format", "gguf", "-o", tmp_path / "taken.gguf")
    assert result.exit_code == 1 and "already exists" in result.output
    result = run("export", "--db", trained, "--dtype", "f16", "-o", tmp_path / "hf")
    assert result.exit_code == 1 and "--dtype is for --format gguf" in result.output
