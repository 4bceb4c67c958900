"""GGUF import: files written by sqlgpt's exporter come back as the same
model; files written the way llama.cpp's converter writes a transformers
model (here with the gguf package, independently of sqlgpt's exporter)
import to logits within 1e-4 of transformers' and ids equal to the
tokenizers library's; Q8_0/Q4_0 blocks are kept bit for bit; bad files
are one-line errors that leave nothing behind."""
import shutil
import sqlite3
import zlib

import numpy as np
import pytest

import sqlgpt
from sqlgpt import store

from test_gguf import TINY, corpus, run, trained  # noqa: F401 (fixtures)

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3 = sqlgpt.contract.PRETOKENIZER_PATTERNS["llama-3"]
TEXTS = ["Hello, world!", "  spaces   and\ttabs\n\nnew lines", "digits 1234567 and 3.14",
         "accents: café naïve", "CJK: 你好世界", "emoji 🙂👍", "it's we'll they're I'M"]


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_an_exported_file_imports_as_the_same_model(trained, tmp_path, dtype):
    assert_round_trip(trained, tmp_path, dtype)


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_heads_wider_than_the_model_round_trip(corpus, tmp_path, dtype):
    trained = tmp_path / "heads.db"
    assert run("train", corpus, "--db", trained, "--preset", "llama", "--kv-heads", "2",
               "--qkv-bias", "--head-size", "16", *TINY).exit_code == 0
    assert sqlgpt.load(trained).arch.q_dim == 64
    assert_round_trip(trained, tmp_path, dtype)


def assert_round_trip(trained, tmp_path, dtype):
    path, db = tmp_path / "m.gguf", tmp_path / "back.db"
    assert run("export", "--db", trained, "--format", "gguf", "--dtype", dtype,
               "-o", path).exit_code == 0
    result = run("import", path, "--db", db)
    assert result.exit_code == 0, result.output
    before, after = sqlgpt.load(trained), sqlgpt.load(db)
    assert after.arch.to_dict() == before.arch.to_dict()
    want, got = before.state_dict(), after.state_dict()
    for name, value in want.items():
        if dtype == "f32" or value.ndim == 1:
            assert np.array_equal(got[name], value), name
        elif dtype == "f16":
            assert np.array_equal(got[name], value.astype(np.float16).astype(np.float32)), name
    if dtype == "f32":
        ids = np.random.default_rng(0).integers(0, before.arch.n_vocab, 16)
        assert np.array_equal(after.logits(ids), before.logits(ids))
    ids = list(range(4, before.arch.n_vocab))
    assert after.tokenizer.decode(ids) == before.tokenizer.decode(ids)  # the same bytes
    if dtype == "q8_0":
        check_blocks_kept(path, db, after)
    check_stored_in(db, after.arch, {"f32": None, "f16": "f16", "q8_0": "int8"}[dtype])


def check_stored_in(db, arch, fmt):
    """The import keeps each matrix in the file's precision: f16 rows of two
    bytes a value, int8 as the quantized copy alone (no float rows)."""
    import sqlite3
    from sqlgpt.model.quant import matrices
    conn = sqlite3.connect(db)
    try:
        formats = dict(conn.execute("SELECT name, format FROM tensor_formats"))
        for spec in matrices(arch):
            name = spec.tied_to or spec.name
            assert formats.get(name) == fmt, name
            layer, component = (spec.layer, spec.component) if spec.layer is not None \
                else (None, None)
            if layer is None:
                continue
            widths = conn.execute("SELECT DISTINCT length(data), length(m) FROM layers WHERE "
                                  "layer = ? AND component = ?", (layer, component)).fetchall()
            expected = {None: [(4 * spec.shape[1], 0)], "f16": [(2 * spec.shape[1], 0)],
                        "int8": []}[fmt]
            assert widths == expected, name
    finally:
        conn.close()


def check_blocks_kept(path, db, model):
    """The int8 copy holds the file's Q8_0 blocks as they are (rows
    reordered only), and the float32 weights are their exact values."""
    from sqlgpt.model.quant import dequantize, matrices
    conn = store.open_database(db)
    try:
        assert store.quantized_sets(conn)[8] == (32, 0)
        _, blocks = store.read_quantized(conn, {s.name: s.shape for s in matrices(model.arch)},
                                         8)
    finally:
        conn.close()
    weights = model.state_dict()
    for spec in matrices(model.arch):
        q, scales = blocks[spec.name]
        w = weights[spec.tied_to].T if spec.tied_to else weights[spec.name]
        assert np.array_equal(dequantize(q, scales, spec.shape[0], 8, 32), w), spec.name
    reader = gguf.GGUFReader(path)
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    raw = np.asarray(down.data, dtype=np.uint8).reshape(down.shape[1], -1, 34)
    q, scales = blocks["layers.1.fc2"]
    assert np.array_equal(q.reshape(raw.shape[0], -1, 32), raw[..., 2:])
    assert np.array_equal(scales, raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))


# ---- a transformers model written as llama.cpp's converter writes it ----

def library_tokenizer(corpus, pattern):
    """A byte-level BPE of the tokenizers library, split by pattern first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def hf_family(kind, vocab, tied, rope=None, head_dim=None):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6,
                  **({"rope_parameters": rope} if rope else {}),
                  **({"head_dim": head_dim} if head_dim else {}))
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # random norms and biases too, so that misplacing one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def permute(w, heads):
    """llama.cpp's converter's permutation of llama's q and k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight", "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
         "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
         "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight":
         "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}


def write_like_llama_cpp(path, kind, model, tok, qtype=None):
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), kind)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"]
                              if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_divisors(cfg))
        if rope["original_max_position_embeddings"] != 8192:  # the converter's assumption
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|end|>" else 1 for t in tokens])
    import json
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in json.loads(tok.to_str())["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|end|>"])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = value.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            out = f"blk.{layer}.{LAYER[rest]}"
        else:
            out = NAMES[name]
        if kind == "llama" and "q_proj" in name:
            value = permute(value, cfg.num_attention_heads)
        if kind == "llama" and "k_proj" in name:
            value = permute(value, cfg.num_key_value_heads)
        if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            writer.add_tensor(out, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        elif qtype and value.ndim == 2:
            writer.add_tensor(out, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(out, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_divisors(cfg):
    """rope_freqs.weight as llama.cpp's converter computes it from a llama
    3.1 config: each pair's frequency divisor."""
    import math
    rope, hs = cfg.rope_parameters, cfg.hidden_size // cfg.num_attention_heads
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old, factor = rope["original_max_position_embeddings"], rope["factor"]
    out = []
    for i in range(0, hs, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / hs)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


# llama 3.2's rope (theta 1e6 puts hs 16's pairs 4 in the blend, 5-7 past it)
LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 1e6, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope", [
    LLAMA32_ROPE,  # (its rope moves these logits by 5e-5: the 1e-5 below tells)
    {**LLAMA32_ROPE, "rope_theta": 1e4, "original_max_position_embeddings": 128},
    {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}])
def test_llama_3s_and_linear_rope_scaling_import_from_gguf_and_export_back(corpus, tmp_path,
                                                                           rope):
    tok = library_tokenizer(corpus, LLAMA3)
    model = hf_family("llama", tok.get_vocab_size(), True, rope)
    path, db = tmp_path / "m.gguf", tmp_path / "m.db"
    write_like_llama_cpp(path, "llama", model, tok)
    result = run("import", path, "--db", db)
    assert result.exit_code == 0, result.output
    ours = sqlgpt.load(db)
    assert ours.arch.rope_scaling == rope["rope_type"]
    row = np.random.default_rng(1).integers(0, tok.get_vocab_size(), 48)
    with torch.no_grad():
        want = model(torch.from_numpy(row[None])).logits.numpy()[0]
    assert np.abs(ours.logits(row) - want).max() < 1e-5
    again = tmp_path / "again.gguf"
    assert run("export", "--db", db, "--format", "gguf", "-o", again).exit_code == 0
    assert run("import", again, "--db", tmp_path / "again.db").exit_code == 0
    back = sqlgpt.load(tmp_path / "again.db")
    assert back.arch.to_dict() == ours.arch.to_dict()
    assert np.array_equal(back.logits(row), ours.logits(row))


def test_rope_freqs_of_another_rule_are_refused(corpus, tmp_path):
    tok = library_tokenizer(corpus, LLAMA3)
    model = hf_family("llama", tok.get_vocab_size(), True, {**LLAMA32_ROPE,
                                                             "high_freq_factor": 2.0})
    path, db = tmp_path / "m.gguf", tmp_path / "m.db"
    write_like_llama_cpp(path, "llama", model, tok)
    result = run("import", path, "--db", db)
    one_line_error(result, db)
    assert "is not llama 3.1's rope scaling" in result.output


@pytest.mark.parametrize("kind,tied,head_dim", [("llama", False, None), ("llama", True, None),
                                               ("qwen2", False, None), ("llama", False, 24),
                                               ("qwen2", True, 8)])
def test_a_transformers_model_in_llama_cpps_layout_imports(corpus, tmp_path, kind, tied,
                                                           head_dim):
    tok = library_tokenizer(corpus, LLAMA3)
    model = hf_family(kind, tok.get_vocab_size(), tied, head_dim=head_dim)
    path, db = tmp_path / "m.gguf", tmp_path / "m.db"
    write_like_llama_cpp(path, kind, model, tok)
    result = run("import", path, "--db", db)
    assert result.exit_code == 0, result.output
    ours = sqlgpt.load(db)
    for row in np.random.default_rng(1).integers(0, tok.get_vocab_size(), (2, 24)):
        with torch.no_grad():
            want = model(torch.from_numpy(row[None])).logits.numpy()[0]
        assert np.abs(ours.logits(row) - want).max() < 1e-4
    for text in TEXTS:
        assert list(ours.tokenizer.encode(text)) == tok.encode(text).ids, text
    assert ours.tokenizer.eos_id == tok.token_to_id("<|end|>")
    state = store.read_train_state(store.open_database(db))
    assert state["chat_template"].startswith("{% for m in messages %}")


@pytest.mark.parametrize("qtype,bits", [("Q8_0", 8), ("Q4_0", 4)])
def test_q8_0_and_q4_0_blocks_are_kept_bit_for_bit(corpus, tmp_path, qtype, bits):
    from sqlgpt.model.quant import dequantize, matrices
    tok = library_tokenizer(corpus, LLAMA3)
    model = hf_family("llama", tok.get_vocab_size(), False)
    path, db = tmp_path / "m.gguf", tmp_path / "m.db"
    write_like_llama_cpp(path, "llama", model, tok, getattr(gguf.GGMLQuantizationType, qtype))
    assert run("import", path, "--db", db).exit_code == 0
    ours = sqlgpt.load(db)
    conn = store.open_database(db)
    _, blocks = store.read_quantized(conn, {s.name: s.shape for s in matrices(ours.arch)},
                                     bits)
    conn.close()
    found = {t.name: t for t in gguf.GGUFReader(path).tensors}
    size = {8: 34, 4: 18}[bits]
    for ours_name, theirs, heads in (("layers.0.fc2", "blk.0.ffn_down.weight", None),
                                     ("layers.1.q", "blk.1.attn_q.weight", 4),
                                     ("layers.1.k", "blk.1.attn_k.weight", 2)):
        t = found[theirs]
        raw = np.asarray(t.data, dtype=np.uint8).reshape(t.shape[1], -1, size)
        if heads:  # llama.cpp's rows, in rotate_half's order
            raw = raw[np.argsort(permute(np.arange(raw.shape[0]), heads))]
        q, scales = blocks[ours_name]
        assert np.array_equal(q.reshape(raw.shape[0], -1, size - 2), raw[..., 2:]), ours_name
        spec = next(s for s in matrices(ours.arch) if s.name == ours_name)
        assert np.array_equal(dequantize(q, scales, spec.shape[0], bits, 32),
                              ours.state_dict()[ours_name]), ours_name
    decoding = sqlgpt.load(db, precision=f"int{bits}")  # from the kept blocks
    assert len(decoding.generate("Hello", max_tokens=8, temperature=0)) > 0


# ---- kept in the precision they came in ----

@pytest.fixture(scope="module")
def stored_imports(corpus, tmp_path_factory):
    """A Q8_0 and an F16 import of one small tied qwen2 model: {qtype: db}."""
    folder = tmp_path_factory.mktemp("stored")
    tok = library_tokenizer(corpus, LLAMA3)
    model = hf_family("qwen2", tok.get_vocab_size(), True)
    dbs = {}
    for qtype in ("Q8_0", "F16"):
        path, dbs[qtype] = folder / f"{qtype}.gguf", folder / f"{qtype}.db"
        write_like_llama_cpp(path, "qwen2", model, tok, getattr(gguf.GGMLQuantizationType, qtype))
        assert run("import", path, "--db", dbs[qtype]).exit_code == 0
    return dbs


@pytest.mark.parametrize("precision", ["f16", "fp32", "bf16"])
def test_an_f16_import_decodes_from_its_half_rows_as_from_float32(stored_imports, precision):
    """A decoder packs an F16 import's matrices straight from its half rows
    (no float32 copy of a tensor): the same panels, in every float
    precision, as packing the float32 values they read back as."""
    from sqlgpt.inference.decoder import Decoder
    stored = sqlgpt.load(stored_imports["F16"], precision)
    plain = sqlgpt.load(stored_imports["F16"])
    expected = Decoder(plain._gpt, precision, weights=plain.state_dict())
    got = stored.decoder()
    assert got.panels.size == expected.panels.size
    assert np.array_equal(got.panels, expected.panels)
    for token in np.random.default_rng(0).integers(0, stored.arch.n_vocab, 6).tolist():
        assert np.array_equal(got.step(token), expected.step(token))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_half_row_that_is_not_finite_is_refused_when_decoding(stored_imports, tmp_path, value):
    """A half row with a valid checksum but a NaN or Inf in it: the decoder
    reading the halves refuses it as the float32 reader does."""
    db = tmp_path / "bad.db"
    shutil.copy(stored_imports["F16"], db)
    conn = sqlite3.connect(db)
    raw, = conn.execute("SELECT data FROM layers WHERE layer = 1 AND component = 'fc2' "
                        "AND i = 3").fetchone()
    row = np.frombuffer(raw, "<f2").copy()
    row[5] = value
    conn.execute("UPDATE layers SET data = ?, crc = ? WHERE layer = 1 AND component = 'fc2' "
                 "AND i = 3", (row.tobytes(), zlib.crc32(row.tobytes())))
    conn.commit()
    conn.close()
    with pytest.raises(sqlgpt.SqlgptError, match="layers.1.fc2 contain NaN or Inf"):
        sqlgpt.load(db, "f16").decoder()


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_an_import_kept_in_its_precision_fine_tunes_and_exports(stored_imports, corpus, tmp_path,
                                                                qtype):
    """A model kept as int8 rows or half rows is read back as the values it
    holds: a LoRA fine-tune on it trains and generates, and merges into a
    float32 model with those values; `info` says how it is kept."""
    db = stored_imports[qtype]
    result = run("info", "--db", db)
    kept = {"Q8_0": "int8", "F16": "f16"}[qtype]
    assert result.exit_code == 0 and f"stored as: {kept} " in result.output, result.output
    tuned, merged = tmp_path / "tuned.db", tmp_path / "merged.db"
    result = run("finetune", "--base", db, corpus, "--db", tuned, "--iters", "2",
                 "--batch-size", "2", "--lora-rank", "2")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(tuned).generate("Hello", max_tokens=4, temperature=0)
    assert run("merge", "--db", tuned, "-o", merged).exit_code == 0
    base, plain = sqlgpt.load(db).state_dict(), sqlgpt.load(merged).state_dict()
    for name in ("wte", "layers.0.ln1_w", "layers.1.k_b"):  # not adapted: the stored values
        assert np.array_equal(plain[name], base[name]), name


# ---- bad files ----

def one_line_error(result, db):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    assert not db.exists()


@pytest.fixture(scope="module")
def good_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / f"{trained.stem}.gguf"
    assert run("export", "--db", trained, "--format", "gguf", "-o", path).exit_code == 0
    return path.read_bytes()


@pytest.mark.parametrize("damage,text", [
    (lambda b: b"GGUX" + b[4:], "is not a GGUF file"),
    (lambda b: b[:len(b) // 2], "is not a GGUF file"),
    (lambda b: b[:40], "is not a GGUF file"),
    (lambda b: b[:8] + (2**60).to_bytes(8, "little") + b[16:], "is not a GGUF file"),
    (lambda b: b[:16] + (2**60).to_bytes(8, "little") + b[24:], "is not a GGUF file"),
    (lambda b: b"", "is not a GGUF file"),
])
def test_a_damaged_file_is_a_one_line_error(good_file, tmp_path, damage, text):
    path, db = tmp_path / "bad.gguf", tmp_path / "bad.db"
    path.write_bytes(damage(good_file))
    result = run("import", path, "--db", db)
    one_line_error(result, db)
    assert text in result.output


def test_what_sqlgpt_does_not_run_is_refused(corpus, tmp_path):
    tok = library_tokenizer(corpus, LLAMA3)
    model = hf_family("llama", tok.get_vocab_size(), False)
    path, db = tmp_path / "k.gguf", tmp_path / "k.db"
    write_like_llama_cpp(path, "llama", model, tok, gguf.GGMLQuantizationType.Q4_1)
    result = run("import", path, "--db", db)
    one_line_error(result, db)
    assert "is Q4_1, which sqlgpt does not read" in result.output
    other = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(other), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run("import", other, "--db", db)
    one_line_error(result, db)
    assert "architecture 'falcon' is not one sqlgpt runs" in result.output
    result = run("import", tmp_path / "absent.gguf", "--db", db)
    one_line_error(result, db)
    assert "is not a directory (a transformers model) or a GGUF file" in result.output


# ---- SentencePiece-style vocabularies (llama 2, TinyLlama, Mistral) ----

def spm_gguf(path, corpus):
    """A llama GGUF whose tokenizer is SentencePiece-style: <unk> <s> </s>,
    the 256 byte-fallback tokens, then pieces with "▁" for spaces, each
    scored by its merge order; random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=400, special_tokens=[]))
    vocab = tok.get_vocab()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    V, C, F = len(tokens), 32, 64
    for key, value in (("context_length", 64), ("embedding_length", C), ("block_count", 1),
                       ("feed_forward_length", F), ("attention.head_count", 4),
                       ("attention.head_count_kv", 4), ("rope.dimension_count", 8)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_layer_norm_rms_eps(1e-6)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (V, C)), ("output_norm.weight", (C,)),
                        ("output.weight", (V, C)), ("blk.0.attn_norm.weight", (C,)),
                        ("blk.0.ffn_norm.weight", (C,)), ("blk.0.attn_q.weight", (C, C)),
                        ("blk.0.attn_k.weight", (C, C)), ("blk.0.attn_v.weight", (C, C)),
                        ("blk.0.attn_output.weight", (C, C)), ("blk.0.ffn_gate.weight", (F, C)),
                        ("blk.0.ffn_up.weight", (F, C)), ("blk.0.ffn_down.weight", (C, F))):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_a_sentencepiece_vocabulary_imports_from_gguf(corpus, tmp_path):
    path, db = tmp_path / "spm.gguf", tmp_path / "spm.db"
    tokens = spm_gguf(path, corpus)
    result = run("import", path, "--db", db)
    assert result.exit_code == 0, result.output
    ours = sqlgpt.load(db).tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + ["the king is dead"]:
        ids = [int(i) for i in ours.encode(text)]
        # transformers' converter prepends no space to a text that starts
        # with one (Metaspace); llama.cpp and llama 2's tokenizer.json do
        if not text[0].isspace():
            assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == " " + text  # every byte back, CJK and emoji by fallback
    assert tokens[ours.encode("🙂")[1]].startswith("<0x")  # not in the pieces: bytes
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0)
    reference.save_pretrained(tmp_path / "hf")  # the Metaspace form, as transformers writes it
    again = sqlgpt.data.tokenizers.hf.HFTokenizer(
        (tmp_path / "hf" / "tokenizer.json").read_text(), {})
    assert again.shape == "sentencepiece"
    for text in TEXTS:
        assert list(again.encode(text)) == reference.encode(text, add_special_tokens=False)
    assert again.decode(again.encode("Hello")).strip() == "Hello"
