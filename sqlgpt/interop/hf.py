"""Hugging Face directories: a sqlgpt model written as transformers reads
it (GPT2LMHeadModel or LlamaForCausalLM: config.json, model.safetensors,
generation_config.json and, for byte-level BPE, tokenizer.json), and such a
directory read back into a sqlgpt database. Nothing is downloaded: a
directory only.

Names and orientations come from the tensor table's `hf` column: GPT-2's
Conv1D matrices are (in, out) like sqlgpt's, with c_attn = [q | k | v] along
out; nn.Linear weights (llama's, and an untied lm_head) are (out, in). Rope's
layout needs no permutation: sqlgpt rotates pairs (i, i + head/2), as
transformers' llama does (rotate_half).

What transformers' two models cannot hold exactly is refused, except where
an exact equivalent exists, which export writes instead: GPT-2 for a model
without biases (zero biases), with parameter-free norms (gains 1, biases 0),
with fixed sinusoidal or no positions (that table, or zeros, as wpe), or
with grouped-query attention (each kv head repeated for its query heads);
llama for parameter-free RMSNorm (gains 1). A model without a final norm
(the lua preset) has no equivalent in either.
"""
import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..chat.template import DEFAULT_TEMPLATE
from ..model.arch import preset, tensor_table
from ..data import safe_json
from ..errors import SqlgptError

GPT2, LLAMA = "gpt2", "llama"
QWEN2 = "qwen2"  # llama's names and layout, with biases on q, k and v alone
MISTRAL = "mistral"  # llama's, with sliding-window attention (exact when it covers the context)
SHARD_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
MAX_HEADER = 100 << 20  # a safetensors header above 100 MB is not one
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}
GELUS = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's tanh GELU, sqlgpt's gelu


def family(arch):
    """Which transformers model can hold arch exactly, or a one-line error."""
    if arch.mlp == "swiglu" or arch.norm == "rmsnorm" or arch.pos == "rope":
        wrong = [f"{k} {getattr(arch, k)}" for k, v in
                 (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu")) if getattr(arch, k) != v]
        if wrong:
            raise SqlgptError(f"transformers' llama needs rmsnorm, rope and swiglu; this model "
                              f"has {', '.join(wrong)}")
        name = LLAMA
    else:
        name = GPT2
        if arch.head_size and arch.head_dim * arch.num_heads != arch.embed_dim:
            raise SqlgptError(f"transformers' gpt2 has heads of n_embd / n_head; this model's "
                              f"are {arch.head_dim} wide")
    if not arch.final_norm:
        raise SqlgptError(f"this model has no final norm (the {arch.preset} preset's layout), "
                          f"and transformers' {name} always applies one: it has no exact "
                          f"equivalent (train with --final-norm to export)")
    return name


def hf_config(arch, tokenizer):
    """config.json's contents."""
    specials = _special_ids(tokenizer)
    if family(arch) == GPT2:
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": arch.n_vocab, "n_positions": arch.seq_len,
                "n_embd": arch.embed_dim, "n_layer": arch.num_layers, "n_head": arch.num_heads,
                "n_inner": arch.hidden_dim, "layer_norm_epsilon": arch.norm_eps,
                "activation_function": "gelu_new" if arch.mlp == "gelu" else "relu",
                "tie_word_embeddings": arch.tie_weights, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "torch_dtype": "float32", **specials}
    if arch.qkv_bias and not arch.bias:  # biases on q, k and v alone: Qwen2's layout
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": QWEN2,
                "vocab_size": arch.n_vocab, "hidden_size": arch.embed_dim,
                "intermediate_size": arch.hidden_dim, "num_hidden_layers": arch.num_layers,
                "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.n_kv_heads,
                "head_dim": arch.head_dim, "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
                "rope_theta": arch.rope_theta, "max_position_embeddings": arch.seq_len,
                **rope_settings(arch),
                "tie_word_embeddings": arch.tie_weights, "use_sliding_window": False,
                "torch_dtype": "float32", **specials}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": arch.n_vocab, "hidden_size": arch.embed_dim,
            "intermediate_size": arch.hidden_dim, "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.n_kv_heads,
            "head_dim": arch.head_dim, "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
            "rope_theta": arch.rope_theta, "max_position_embeddings": arch.seq_len,
            **rope_settings(arch),
            "tie_word_embeddings": arch.tie_weights, "attention_bias": arch.bias,
            "mlp_bias": arch.bias, "torch_dtype": "float32", **specials}


def _special_ids(tokenizer):
    ids = {"pad_token_id": getattr(tokenizer, "pad_id", None),
           "bos_token_id": getattr(tokenizer, "bos_id", None),
           "eos_token_id": getattr(tokenizer, "eos_id", None)}
    return {k: v for k, v in ids.items() if v is not None}


def hf_tensors(arch, weights):
    """{hf name: float32 array} for arch's weights ({name: array}), in
    transformers' names and orientations, with the exact equivalents the
    module docstring lists."""
    kind = family(arch)
    out, parts = {}, {}
    for spec in tensor_table(arch):
        if spec.tied_to:
            continue  # transformers ties lm_head to the embedding itself
        name, part = spec.hf
        value = np.asarray(weights[spec.name], dtype=np.float32)
        if kind == GPT2 and spec.component in ("k", "v", "k_b", "v_b"):
            value = _repeat_kv(arch, value)
        linear = kind == LLAMA or spec.name == "head"  # nn.Linear: (out, in)
        if value.ndim == 2 and linear and spec.name not in ("wte", "wpe"):
            value = value.T
        if part is None:
            out[name] = np.ascontiguousarray(value)
        else:
            parts.setdefault(name, []).append((part, value))
    for name, pieces in parts.items():  # GPT-2's c_attn: [q | k | v] along out
        out[name] = np.ascontiguousarray(np.concatenate([v for _, v in sorted(
            pieces, key=lambda p: p[0])], axis=-1))
    if kind == GPT2:
        _gpt2_equivalents(arch, out)
    else:
        for layer in range(arch.num_layers):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out.setdefault(f"model.layers.{layer}.{norm}.weight",
                               np.ones(arch.embed_dim, np.float32))
        out.setdefault("model.norm.weight", np.ones(arch.embed_dim, np.float32))
    return out


def _repeat_kv(arch, value):
    """k or v (or their bias) with each kv head repeated for the query heads
    that read it: GPT-2's multi-head attention computing grouped-query's."""
    group = arch.num_heads // arch.n_kv_heads
    if group == 1:
        return value
    heads = value.reshape(*value.shape[:-1], arch.n_kv_heads, arch.head_dim)
    return np.repeat(heads, group, axis=-2).reshape(*value.shape[:-1], arch.q_dim)


def _gpt2_equivalents(arch, out):
    """The parameters GPT-2 always has and this model may lack: zero biases,
    unit norm gains, the position table (fixed sinusoids, or zeros)."""
    from ..model.model import sinusoids
    C, F = arch.embed_dim, arch.hidden_dim
    for layer in range(arch.num_layers):
        h = f"transformer.h.{layer}"
        for name, size in (("ln_1.weight", -C), ("ln_1.bias", C), ("attn.c_attn.bias", 3 * C),
                           ("attn.c_proj.bias", C), ("ln_2.weight", -C), ("ln_2.bias", C),
                           ("mlp.c_fc.bias", F), ("mlp.c_proj.bias", C)):
            out.setdefault(f"{h}.{name}", np.full(abs(size), 1.0 if size < 0 else 0.0,
                                                  np.float32))
    out.setdefault("transformer.ln_f.weight", np.ones(C, np.float32))
    out.setdefault("transformer.ln_f.bias", np.zeros(C, np.float32))
    if "transformer.wpe.weight" not in out:
        out["transformer.wpe.weight"] = (sinusoids(arch.seq_len, C) if arch.pos == "sinusoidal"
                                         else np.zeros((arch.seq_len, C), np.float32))


def write_safetensors(path, tensors):
    """A safetensors file of float32 tensors, in name order."""
    header, offset = {}, 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


def read_safetensors(path):
    """{name: float32 array} of a safetensors file (F32, F16, BF16, F64),
    every offset and size checked: a damaged file is a one-line error."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SqlgptError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise SqlgptError(f"{path} has a corrupt safetensors header (length {length})")
        try:
            header = safe_json.loads(f.read(length), "it")
        except SqlgptError as e:
            raise SqlgptError(f"{path} has a corrupt safetensors header ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise SqlgptError(f"{path} has a corrupt safetensors header (not an object)")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, width = DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            start, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SqlgptError(f"{path}: tensor {name!r} has an unsupported dtype or a corrupt "
                              f"entry") from None
        if not 1 <= len(shape) <= 2:
            raise SqlgptError(f"{path}: tensor {name!r} has {len(shape)} dimensions (a model's "
                              f"tensors have 1 or 2)")
        if min(shape, default=0) < 0 or not (0 <= start <= stop <= len(data)) or \
                stop - start != width * math.prod(shape):
            raise SqlgptError(f"{path}: tensor {name!r}'s bytes do not match its shape")
        raw = np.frombuffer(data[start:stop], dtype=kind)
        if entry["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float32).reshape(shape)
    return tensors


def export(model, out_dir):
    """Write model (an api.Model) as a transformers directory at out_dir
    (created; it must not exist or be empty). Returns the files written."""
    check_new_directory(out_dir)
    arch = model.arch
    config = hf_config(arch, model.tokenizer)  # refuses what cannot be expressed, first
    tensors = hf_tensors(arch, model.state_dict_view())
    with new_directory(out_dir) as tmp:
        files = {"config.json": config, "generation_config.json": _special_ids(model.tokenizer)}
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        write_safetensors(tmp / SAFETENSORS, tensors)
        written = [*files, SAFETENSORS]
        if model.tokenizer.kind in ("bpe", "hf"):
            written += _write_tokenizer(tmp, model.tokenizer, arch,
                                        model.chat_template or DEFAULT_TEMPLATE)
    return written


def check_new_directory(out_dir):
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SqlgptError(f"{out_dir} exists and is not an empty directory; name a new one")


@contextlib.contextmanager
def new_directory(out_dir):
    """A temporary directory beside out_dir to write into; moved into place
    as out_dir when the block ends, removed if it fails: out_dir is whole or
    absent."""
    out_dir = Path(out_dir)
    check_new_directory(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tokenizer(directory, tokenizer, arch, chat_template):
    """tokenizer.json (the library's own definition, sqlgpt's specials as its
    added tokens) and what transformers' AutoTokenizer reads beside it (the
    chat template in tokenizer_config.json)."""
    (directory / "tokenizer.json").write_text(tokenizer.state()["tokenizer_json"])
    special = {f"{role}_token": tokenizer.pieces([getattr(tokenizer, f"{role}_id")])[0]
               for role in ("pad", "unk", "bos", "eos")
               if getattr(tokenizer, f"{role}_id") is not None}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": arch.seq_len,
         "clean_up_tokenization_spaces": False, "chat_template": chat_template, **special},
        indent=2) + "\n")
    return ["tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"]


def _hf_arch(config):
    """The ArchConfig a config.json describes, or a one-line error; sizes
    that are the defaults' are stored as defaults (ffn_dim and kv_heads 0),
    as training a model of that shape stores them."""
    arch = _described(config)
    if replace(arch, ffn_dim=0).hidden_dim == arch.hidden_dim:
        arch.ffn_dim = 0
    if arch.kv_heads == arch.num_heads:
        arch.kv_heads = 0
    return arch.validate()


def _described(config):
    kind = config.get("model_type")
    try:
        if kind == GPT2:
            act = config.get("activation_function", "gelu_new")
            if act not in (*GELUS, "relu"):
                raise SqlgptError(f"GPT-2 activation {act!r} is not one sqlgpt has (gelu_new, "
                                  f"relu)")
            C = int(config["n_embd"])
            return preset("gpt2", n_vocab=int(config["vocab_size"]), embed_dim=C,
                          num_heads=int(config["n_head"]), num_layers=int(config["n_layer"]),
                          seq_len=int(config["n_positions"]),
                          ffn_dim=int(config.get("n_inner") or 4 * C),
                          norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
                          mlp="gelu" if act in GELUS else "relu",
                          tie_weights=bool(config.get("tie_word_embeddings", True))).validate()
        if kind in (LLAMA, QWEN2, MISTRAL):
            if config.get("hidden_act", "silu") != "silu":
                raise SqlgptError(f"llama activation {config['hidden_act']!r} is not silu")
            C, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or C // max(heads, 1))
            if bool(config.get("attention_bias", False)) != bool(config.get("mlp_bias", False)):
                raise SqlgptError("attention_bias and mlp_bias must agree (sqlgpt has one bias "
                                  "setting)")
            # Mistral applies its window whenever it names one, Qwen2 when use_sliding_window
            window = config.get("sliding_window") if kind == MISTRAL or \
                config.get("use_sliding_window") else None
            if window is not None and int(window) < int(config.get("max_position_embeddings",
                                                                   2048)):
                raise SqlgptError(f"a sliding window of {window} tokens, narrower than the "
                                  f"context, is not supported")
            return preset("llama", n_vocab=int(config["vocab_size"]), embed_dim=C,
                          num_heads=heads, head_size=0 if head_dim * heads == C else head_dim,
                          kv_heads=int(config.get("num_key_value_heads") or heads),
                          num_layers=int(config["num_hidden_layers"]),
                          seq_len=int(config.get("max_position_embeddings", 2048)),
                          ffn_dim=int(config["intermediate_size"]),
                          norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                          **_rope_fields(config),
                          bias=bool(config.get("attention_bias", False)),
                          qkv_bias=kind == QWEN2,
                          tie_weights=bool(config.get("tie_word_embeddings", False))).validate()
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise SqlgptError(f"config.json lacks or garbles a field: {e}") from None
    raise SqlgptError(f"unsupported architecture {kind!r} (sqlgpt imports gpt2, llama, qwen2 "
                      f"and mistral)")


# config.json's rope settings (rope_parameters, or rope_scaling before
# transformers 5) -> ArchConfig's
ROPE_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq",
             "high_freq_factor": "rope_high_freq",
             "original_max_position_embeddings": "rope_original_context"}
ROPE_NEEDS = {"linear": ("factor",), "llama3": tuple(ROPE_KEYS)}


def _rope_fields(config):
    """ArchConfig's rope fields of a llama-family config.json: theta and the
    linear or llama3 scaling, the only kinds the kernel turns by."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise SqlgptError("config.json's rope settings are not an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))}
    if kind == "default":
        return fields
    if kind not in ROPE_NEEDS:
        raise SqlgptError(f"rope scaling {kind!r} is not supported (default, linear and llama3 "
                          f"are)")
    missing = [key for key in ROPE_NEEDS[kind] if key not in rope]
    if missing:
        raise SqlgptError(f"config.json's {kind} rope scaling lacks {missing[0]}")
    fields["rope_scaling"] = kind
    for key in ROPE_NEEDS[kind]:
        fields[ROPE_KEYS[key]] = (int if key.startswith("original") else float)(rope[key])
    return fields


def rope_settings(arch):
    """config.json's rope keys of an architecture: transformers 5's
    rope_parameters, and a scaled rope also as transformers 4's rope_scaling."""
    if arch.rope_scaling == "none":
        return {"rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta}}
    scaling = {"rope_type": arch.rope_scaling,
               **{key: getattr(arch, ROPE_KEYS[key]) for key in ROPE_NEEDS[arch.rope_scaling]}}
    return {"rope_parameters": {**scaling, "rope_theta": arch.rope_theta},
            "rope_scaling": scaling}


def read_hf(directory):
    """(arch, {name: float32 array} in sqlgpt's names, tokenizer or None) of a
    transformers directory, every tensor placed and its shape checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SqlgptError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SqlgptError(f"{directory} has no config.json")
    try:
        config = safe_json.loads(config_path.read_bytes(), str(config_path))
    except OSError as e:
        raise SqlgptError(f"cannot read {config_path}: {e.strerror}") from None
    if not isinstance(config, dict):
        raise SqlgptError(f"{config_path} is not a JSON object")
    arch = _hf_arch(config)
    return arch, _sqlgpt_weights(arch, _read_weights(directory)), \
        _read_tokenizer(directory, arch, config)


def _read_weights(directory):
    """{name: float32 array} of a directory's model.safetensors, or of the
    shards its model.safetensors.index.json lists (each a file in the
    directory, each tensor found in the shard the index names)."""
    single, index = directory / SAFETENSORS, directory / SHARD_INDEX
    if single.is_file():
        return read_safetensors(single)
    if not index.is_file():
        raise SqlgptError(f"{directory} has no {SAFETENSORS} or {SHARD_INDEX} (.bin weights "
                          f"are not read: save the model with safetensors)")
    listing = safe_json.loads(index.read_bytes(), str(index))
    weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and Path(v).name == v and v not in (".", "..")
            for v in weight_map.values()):
        raise SqlgptError(f"{index} has no weight_map of tensor names to shard files beside it")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            raise SqlgptError(f"{index} names the shard {shard}, which {directory} lacks")
        found = read_safetensors(path)
        wanted = {name for name, where in weight_map.items() if where == shard}
        missing = sorted(wanted - set(found))
        if missing:
            raise SqlgptError(f"{path} lacks {missing[0]}, which {SHARD_INDEX} puts there")
        tensors.update({name: found[name] for name in wanted})
    return tensors


def _special_roles(directory, config):
    """{role: id} of an imported tokenizer's specials: the ids config.json
    and generation_config.json give (the latter wins), unk from
    tokenizer_config.json's unk_token where the vocab has it."""
    roles = {}
    for source in (config, _json_or_empty(directory / "generation_config.json")):
        for role in ("pad", "bos", "eos"):
            value = source.get(f"{role}_token_id")
            if isinstance(value, list):  # several eos ids: the first
                value = value[0] if value else None
            if isinstance(value, int) and not isinstance(value, bool):
                roles[role] = value
    unk = _json_or_empty(directory / "tokenizer_config.json").get("unk_token")
    if isinstance(unk, dict):
        unk = unk.get("content")
    if isinstance(unk, str):
        added = _json_or_empty(directory / "tokenizer.json").get("added_tokens")
        found = [t.get("id") for t in added if isinstance(t, dict) and t.get("content") == unk] \
            if isinstance(added, list) else []
        if found:
            roles["unk"] = found[0]
    return roles


def read_chat_template(directory):
    """A transformers directory's chat template: chat_template.jinja (where
    transformers 5 saves it), else tokenizer_config.json's chat_template
    (text, or a list of named ones: the one named default); None if none."""
    path = Path(directory) / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise SqlgptError(f"{path} is not a UTF-8 text file") from None
    template = _json_or_empty(Path(directory) / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and
                         t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def _json_or_empty(path):
    try:
        value = safe_json.loads(path.read_bytes(), str(path))
    except (OSError, SqlgptError):
        return {}
    return value if isinstance(value, dict) else {}


def _sqlgpt_weights(arch, tensors):
    """{sqlgpt name: array} from transformers' tensors, the inverse of
    hf_tensors (a GPT-2 model holds every parameter it always has)."""
    kind = family(arch)
    out, used, parts = {}, set(), {}
    for spec in tensor_table(arch):
        if spec.tied_to:
            continue
        name, part = spec.hf
        if name not in tensors and name.startswith("transformer."):
            name = name[len("transformer."):]  # GPT-2's own checkpoints: wte.weight, h.0...
        if name not in tensors:
            raise SqlgptError(f"the weights lack {spec.hf[0]} (sqlgpt's {spec.name})")
        used.add(name)
        value = tensors[name]
        if part is not None:  # c_attn: q, k, v along out, in that order
            start = parts.get(name, 0)
            width = spec.shape[-1]
            value = value[..., start:start + width]
            parts[name] = start + width
        linear = kind == LLAMA or spec.name == "head"
        if value.ndim == 2 and linear and spec.name not in ("wte", "wpe"):
            value = value.T
        if tuple(value.shape) != tuple(spec.shape):
            raise SqlgptError(f"{name} has shape {tuple(tensors[name].shape)}; the config "
                              f"makes {spec.name} {tuple(spec.shape)}")
        out[spec.name] = np.ascontiguousarray(value, dtype=np.float32)
    for name, end in parts.items():
        if tensors[name].shape[-1] != end:
            raise SqlgptError(f"{name} has {tensors[name].shape[-1]} outputs, not {end}")
    ignored = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")
    extra = sorted(n for n in tensors if n not in used and not n.endswith(ignored)
                   and not (arch.tie_weights and n == "lm_head.weight"))
    if extra:
        raise SqlgptError(f"the weights hold tensors this config has no place for: "
                          f"{', '.join(extra[:5])}")
    return out


def _read_tokenizer(directory, arch, config):
    """The tokenizer of tokenizer.json: sqlgpt's BPE when it is in sqlgpt's
    layout (its four specials first, sqlgpt's pre-tokenization, as export
    writes it), else the library's own byte-level BPE as it is (the hf
    kind), its special ids from the directory's configs; None without one."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from ..data.tokenizers.bpe import from_library_json
    from ..data.tokenizers.hf import HFTokenizer
    text = path.read_text(errors="replace")
    try:
        tokenizer = from_library_json(text)
    except SqlgptError:
        tokenizer = HFTokenizer(text, _special_roles(directory, config))
    if tokenizer.n_ids != arch.n_vocab:
        raise SqlgptError(f"tokenizer.json has {tokenizer.n_ids} ids, the model "
                          f"{arch.n_vocab}")
    return tokenizer
