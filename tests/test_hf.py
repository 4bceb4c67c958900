"""Hugging Face directories: sqlgpt models exported and loaded by
transformers itself (logits, greedy continuations, tokenizer ids), models
made by transformers imported, exact round trips, and refusals."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from tokenizers import Tokenizer

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.interop.hf import read_safetensors, write_safetensors

from conftest import CORPUS

TINY = ["--embed-dim", "32", "--heads", "4", "--layers", "2", "--seq-len", "32",
        "--batch-size", "4", "--vocab-size", "300", "--iters", "8", "--lr", "3e-3"]
TEXT = "KING RICHARD:\nWhat say you, my lord?"
# name -> train options: the presets, and models GPT-2 holds by an exact equivalent
MODELS = {
    "gpt2": ["--preset", "gpt2"],
    "gpt2-untied": ["--preset", "gpt2", "--no-tie-weights"],
    "llama": ["--preset", "llama", "--kv-heads", "2"],
    "llama-bias-tied": ["--preset", "llama", "--bias", "--tie-weights"],
    "qwen2": ["--preset", "llama", "--qkv-bias", "--kv-heads", "2"],
    "gpt2-equivalents": ["--preset", "gpt2", "--no-bias", "--no-norm-affine", "--pos",
                         "sinusoidal", "--kv-heads", "2", "--mlp", "relu"],
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "corpus.txt"
    path.write_text(CORPUS.read_text()[:40000])
    return path


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, corpus):
    db = corpus.parent / f"{request.param}.db"
    result = run("train", corpus, "--db", db, *MODELS[request.param], *TINY)
    assert result.exit_code == 0, result.output
    return db


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.array([ids], dtype=np.int64))).logits[0].numpy()


def assert_same_greedy(theirs, ours, ids):
    """transformers' greedy continuation of ids is sqlgpt's, to the context's
    end: sqlgpt never samples <pad> and <bos> (suppressed there too) and stops
    at <eos>."""
    n_new = ours.arch.seq_len - len(ids)
    greedy = theirs.generate(torch.tensor(np.array([ids], dtype=np.int64)), do_sample=False,
                             max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                             pad_token_id=0, suppress_tokens=[0, 2])[0, len(ids):].tolist()
    mine = list(ours.generate_ids(ours.decode(ids), max_tokens=n_new, temperature=0,
                                  allow_unk=True))
    assert greedy[:len(mine)] == mine and (len(mine) == n_new or greedy[len(mine)] == 3)


def test_transformers_loads_the_export_and_agrees(trained, tmp_path):
    out = tmp_path / "hf"
    result = run("export", "--db", trained, "--format", "hf", "-o", out)
    assert result.exit_code == 0, result.output
    ours = sqlgpt.load(trained)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ours.encode(TEXT)
    assert np.abs(hf_logits(theirs, ids) - ours.logits(ids)).max() < 1e-4
    assert_same_greedy(theirs, ours, ids)
    # the tokenizer, read by the tokenizers library and by transformers
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(TEXT).ids == list(ids)
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast(TEXT, add_special_tokens=False)["input_ids"] == list(ids)
    assert (fast.eos_token, fast.eos_token_id, fast.pad_token_id) == ("<eos>", 3, 0)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == ours.arch.tie_weights
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3


def test_import_of_an_export_is_the_same_model_bit_for_bit(trained, tmp_path):
    out, back = tmp_path / "hf", tmp_path / "back.db"
    assert run("export", "--db", trained, "-o", out).exit_code == 0
    result = run("import", out, "--db", back)
    assert result.exit_code == 0, result.output
    a, b = sqlgpt.load(trained), sqlgpt.load(back)
    if trained.stem == "gpt2-equivalents":  # GPT-2 holds it as its exact equivalent
        assert b.arch.n_kv_heads == b.arch.num_heads and b.arch.bias
        ids = a.encode(TEXT)
        assert np.abs(a.logits(ids) - b.logits(ids)).max() < 1e-4
        return
    assert b.arch == a.arch
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(np.array_equal(w, b.state_dict()[n]) for n, w in a.state_dict().items())
    assert b.generate("KING", max_tokens=12, seed=2) == a.generate("KING", max_tokens=12, seed=2)
    # it fine-tunes, and resuming it is refused with the way forward
    result = run("train", "--db", back, "--resume", "--iters", "20")
    assert result.exit_code == 1 and "fine-tune it with --base" in result.output


# llama 3.1's rope over hs 12 at theta 5000 and an original context of 64:
# pair 0 kept, pair 1 blended, the rest stretched 8 times
ROPES = {"llama3-rope": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
         "linear-rope": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 3.0}}


# heads whose widths do not add up to hidden_size (48 = 4 x 12)
HEAD_DIMS = {"llama-head-dim": 16, "qwen2-head-dim": 8}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral", "llama-sharded",
                                  *ROPES, *HEAD_DIMS])
def test_models_made_by_transformers_import_with_their_logits(corpus, tmp_path, kind):
    base = tmp_path / "base.db"  # for its tokenizer (sqlgpt's layout)
    assert run("train", corpus, "--db", base, "--preset", "gpt2" if kind == "gpt2" else "llama",
               *TINY, "--iters", "1").exit_code == 0
    vocab = sqlgpt.load(base).arch.n_vocab
    torch.manual_seed(0)
    heads = {"head_dim": HEAD_DIMS[kind]} if kind in HEAD_DIMS else {}
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=48, n_layer=2,
                                         n_head=4, activation_function="gelu_new")
        model = transformers.GPT2LMHeadModel(config)
    elif kind.startswith("qwen2"):
        config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=32,
                                          rope_theta=5000.0, tie_word_embeddings=True,
                                          **heads)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "mistral":  # a window as wide as the context: exactly llama's attention
        config = transformers.MistralConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=32,
                                            sliding_window=32, rope_theta=5000.0)
        model = transformers.MistralForCausalLM(config)
    else:
        rope = ROPES.get(kind, {"rope_type": "default", "rope_theta": 5000.0})
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=32,
                                          rope_parameters=rope, **heads)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # well away from init's exact ones and zeros
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path / "made"
    model.save_pretrained(out, **({"max_shard_size": "40KB"} if kind.endswith("sharded") else {}))
    assert (out / "model.safetensors.index.json").is_file() == kind.endswith("sharded")
    if kind == "gpt2":  # GPT-2's own checkpoints name its tensors without "transformer."
        tensors = read_safetensors(out / "model.safetensors")
        write_safetensors(out / "model.safetensors",
                          {n.removeprefix("transformer."): t for n, t in tensors.items()})
    assert run("export", "--db", base, "-o", tmp_path / "tok").exit_code == 0
    shutil.copy(tmp_path / "tok" / "tokenizer.json", out / "tokenizer.json")
    result = run("import", out, "--db", tmp_path / "made.db")
    assert result.exit_code == 0, result.output
    ours = sqlgpt.load(tmp_path / "made.db")
    ids = ours.encode(TEXT)
    assert np.abs(hf_logits(model.eval(), ids) - ours.logits(ids)).max() < 1e-4
    assert_same_greedy(model, ours, ids)
    if kind in HEAD_DIMS:
        assert ours.arch.head_dim == HEAD_DIMS[kind] and ours.arch.q_dim != 48
    if kind in ROPES or kind in HEAD_DIMS:  # and the export carries the scaling or heads back
        if kind in ROPES:
            assert ours.arch.rope_scaling == ROPES[kind]["rope_type"]
        assert run("export", "--db", tmp_path / "made.db", "-o", tmp_path / "back").exit_code == 0
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        assert np.abs(hf_logits(again, ids) - ours.logits(ids)).max() < 1e-4


def test_a_sliding_window_narrower_than_the_context_is_refused(tmp_path):
    config = transformers.MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=16)
    out = tmp_path / "mistral"
    transformers.MistralForCausalLM(config).save_pretrained(out)
    result = run("import", out, "--db", tmp_path / "m.db")
    assert result.exit_code == 1 and "sliding window of 16 tokens" in result.output
    assert not (tmp_path / "m.db").exists()


def test_a_shard_index_pointing_elsewhere_or_at_missing_shards_is_refused(tmp_path):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      max_position_embeddings=32)
    out = tmp_path / "sharded"
    transformers.LlamaForCausalLM(config).save_pretrained(out, max_shard_size="40KB")
    index = out / "model.safetensors.index.json"
    listing = json.loads(index.read_text())
    for bad, message in (("../../etc/passwd", "no weight_map"), ("gone.safetensors", "lacks")):
        changed = {**listing, "weight_map": {**listing["weight_map"],
                                             "model.norm.weight": bad}}
        index.write_text(json.dumps(changed))
        result = run("import", out, "--db", tmp_path / "m.db")
        assert result.exit_code == 1 and message in result.output, result.output


def test_import_onto_an_existing_file_says_how_to_replace_it(trained, tmp_path):
    out, taken = tmp_path / "hf", tmp_path / "taken.db"
    assert run("export", "--db", trained, "-o", out).exit_code == 0
    shutil.copy(trained, taken)
    before = taken.read_bytes()
    result = run("import", out, "--db", taken)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert "--resume" not in result.output  # import has none
    assert taken.read_bytes() == before


def test_what_transformers_cannot_hold_is_refused(corpus, tmp_path):
    db = tmp_path / "lua.db"
    assert run("train", corpus, "--db", db, *TINY[:-4], "--vocab-size", "80", "--iters", "1"
               ).exit_code == 0
    result = run("export", "--db", db, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "no final norm" in result.output
    assert not (tmp_path / "out").exists()
    mixed = tmp_path / "mixed.db"
    assert run("train", corpus, "--db", mixed, "--preset", "llama", "--norm", "layernorm",
               *TINY).exit_code == 0
    result = run("export", "--db", mixed, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "needs rmsnorm, rope and swiglu" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = run("export", "--db", mixed, "-o", tmp_path / "full")
    assert result.exit_code == 1


@pytest.fixture
def exported(trained, tmp_path):
    out = tmp_path / "hf"
    assert run("export", "--db", trained, "-o", out).exit_code == 0
    return out


def refused(directory, db, message):
    result = run("import", directory, "--db", db)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not db.exists()


def test_bad_directories_are_one_line_errors_and_write_nothing(exported, tmp_path):
    db = tmp_path / "new.db"
    notes = tmp_path / "notes.txt"
    notes.write_text("an app's file")
    result = run("import", exported, "--db", notes, "--overwrite")
    assert result.exit_code == 1 and "not a sqlgpt database" in result.output
    assert notes.read_text() == "an app's file"
    refused(tmp_path / "nowhere", db, "is not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, db, "has no config.json")
    config = json.loads((exported / "config.json").read_text())
    no_weights = tmp_path / "no_weights"
    shutil.copytree(exported, no_weights)
    (no_weights / "model.safetensors").unlink()
    refused(no_weights, db, "has no model.safetensors")
    bert = tmp_path / "bert"
    shutil.copytree(exported, bert)
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    refused(bert, db, "unsupported architecture 'bert'")
    wide = tmp_path / "wide"
    shutil.copytree(exported, wide)
    key = "n_inner" if config["model_type"] == "gpt2" else "intermediate_size"
    (wide / "config.json").write_text(json.dumps({**config, key: config[key] * 2}))
    refused(wide, db, "has shape")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported, corrupt)
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[8:20] = b"\xff" * 12
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    refused(corrupt, db, "corrupt safetensors header")
    short = tmp_path / "short"
    shutil.copytree(exported, short)
    raw = (short / "model.safetensors").read_bytes()
    (short / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    refused(short, db, "do not match its shape")
    foreign = tmp_path / "foreign"  # a tokenizer of another kind (word level)
    shutil.copytree(exported, foreign)
    from tokenizers import models
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config["vocab_size"])},
                                       unk_token="w0"))
    words.save(str(foreign / "tokenizer.json"))
    refused(foreign, db, "only BPE tokenizers import")
    garbled = tmp_path / "garbled"
    shutil.copytree(exported, garbled)
    (garbled / "tokenizer.json").write_text("{not json")
    refused(garbled, db, "tokenizer.json is not valid JSON")
    nan = tmp_path / "nan"
    shutil.copytree(exported, nan)
    tensors = read_safetensors(nan / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    write_safetensors(nan / "model.safetensors", tensors)
    refused(nan, db, "NaN or Inf")


def test_a_fine_tunes_peft_export_on_its_bases_export_gives_its_logits(trained, corpus,
                                                                       tmp_path):
    peft = pytest.importorskip("peft")
    tuned = tmp_path / "tuned.db"
    targets = "q,k,v,proj,fc1,fc2" if "llama" not in trained.stem else "q,v,gate,fc2"
    assert run("finetune", "--base", trained, corpus, "--db", tuned, "--iters", "3",
               "--batch-size", "4", "--lr", "3e-2", "--lora-rank", "4", "--lora-targets",
               targets).exit_code == 0
    assert run("export", "--db", trained, "-o", tmp_path / "base").exit_code == 0
    result = run("export", "--db", tuned, "--format", "peft", "-o", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ours, plain = sqlgpt.load(tuned), sqlgpt.load(trained)
    ids = ours.encode(TEXT)
    assert np.abs(hf_logits(model, ids) - ours.logits(ids)).max() < 1e-4
    assert np.abs(plain.logits(ids) - ours.logits(ids)).max() > 1e-2  # the adapters count
    result = run("export", "--db", trained, "--format", "peft", "-o", tmp_path / "again")
    assert result.exit_code == 1 and "only a LoRA fine-tune exports as peft" in result.output


def gpt2_style_tokenizer(text, path):
    """A tokenizer laid out as GPT-2's own: byte-level BPE with GPT-2's
    regex, the 256 bytes first and <|endoftext|> the last id."""
    from helpers import byte_level_bpe
    tok = byte_level_bpe(text, 400, ["<|endoftext|>"])
    tok.save(str(path))
    return tok


def test_a_model_with_its_own_gpt2_tokenizer_imports_generates_and_fine_tunes(corpus,
                                                                            tmp_path):
    out = tmp_path / "gpt2-own"
    out.mkdir()
    text = corpus.read_text()
    tok = gpt2_style_tokenizer(text, out / "tokenizer.json")
    eot = tok.token_to_id("<|endoftext|>")
    assert eot == tok.get_vocab_size() - 1 and tok.token_to_id("!") == 0
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=eot, eos_token_id=eot))
    model.save_pretrained(out)
    db = tmp_path / "own.db"
    result = run("import", out, "--db", db)
    assert result.exit_code == 0, result.output
    ours = sqlgpt.load(db)
    assert ours.tokenizer.kind == "hf" and ours.tokenizer.eos_id == eot
    assert ours.tokenizer.pad_id is None and ours.tokenizer.bos_id == eot
    assert eot not in ours._banned(allow_unk=False)  # bos is eos here: the end stays reachable
    ids = ours.encode(TEXT)
    assert list(ids) == tok.encode(TEXT).ids and ours.decode(ids) == TEXT
    assert eot not in ours.encode("a <|endoftext|> b")  # text is text, never the special
    assert np.abs(hf_logits(model.eval(), ids) - ours.logits(ids)).max() < 1e-4
    # id 0 ("!") is a token like any other: scored by eval, and never banned
    assert ours.evaluate("!!! what !!!").tokens == len(ours.encode("!!! what !!!")) - 1
    ours.generate("KING", max_tokens=5, seed=1)
    # the tokenizer survives the database, and the export back is the same tokenizer
    assert run("export", "--db", db, "-o", tmp_path / "back").exit_code == 0
    back = Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    assert back.encode(TEXT).ids == tok.encode(TEXT).ids
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == eot
    result = run("finetune", "--base", db, corpus, "--db", tmp_path / "tuned.db", "--iters",
                 "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    # it comes with an imported model: train cannot build one
    assert run("train", corpus, "--db", tmp_path / "x.db", "--tokenizer", "hf").exit_code == 2
