"""GGUF files for llama.cpp (written with the `gguf` package): the
architecture's metadata keys, the byte-level BPE tokenizer (tokens,
merges, special ids), and the tensors under llama.cpp's names and
layouts, as its own converter (convert_hf_to_gguf.py) writes them.

The tensors start from the Hugging Face export's (sqlgpt.interop.hf: the same
names, orientations and exact equivalents), renamed; llama's q and k are
permuted from rotate_half's pairs (i, i + head/2) to the interleaved pairs
(2i, 2i + 1) llama.cpp's rope turns. Matrices are (out, in) as numpy
arrays (ggml's ne = [in, out]); vectors stay float32, as the converters
keep them.
"""
from dataclasses import replace

import numpy as np

from ..chat.template import DEFAULT_TEMPLATE
from ..errors import SqlgptError
from ..model.arch import hf_to_gguf
from ..model.model import rope_frequencies
from .hf import GPT2, LLAMA, QWEN2, hf_config, hf_tensors

ROPE_FREQS = "rope_freqs.weight"  # llama 3's rope scaling: each pair's frequency divisor

FORMATS = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # Q8_0 and Q4_0 quantize rows in blocks of 32
def rope_interleaved(w, heads):
    """q or k (out = heads * hs rows, or a bias) from rotate_half's layout
    to llama.cpp's interleaved one (convert_hf_to_gguf's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def gguf_tensors(arch, weights):
    """{llama.cpp name: float32 array} of a model."""
    kind, names = gguf_arch(arch), hf_to_gguf(arch)
    out = {}
    for name, value in hf_tensors(arch, weights).items():
        if kind == GPT2 and value.ndim == 2 and not name.startswith(("transformer.w", "lm_")):
            value = value.T  # Conv1D (in, out) -> (out, in)
        # llama.cpp's llama turns interleaved pairs; its qwen2 turns rotate_half's, as is
        if kind == LLAMA and ".q_proj." in name:
            value = rope_interleaved(value, arch.num_heads)
        if kind == LLAMA and ".k_proj." in name:
            value = rope_interleaved(value, arch.n_kv_heads)
        out[names[name]] = np.ascontiguousarray(value, dtype=np.float32)
    if kind == GPT2 and "output.weight" not in out:  # llama.cpp's gpt2 needs its own copy
        out["output.weight"] = out["token_embd.weight"]  # (its converter writes one too)
    return out


def gguf_arch(arch):
    """llama.cpp's architecture name for arch: the transformers model's."""
    return hf_config(arch, None)["model_type"]


def export(model, path, fmt="f32"):
    """Write model (an api.Model; byte-level BPE) as the GGUF file path:
    matrices in fmt (f32, f16 or q8_0: Q8_0 where a row divides into 32s),
    vectors float32. Returns the number of tensors written."""
    try:
        import gguf
    except ImportError:
        raise SqlgptError("GGUF export needs the gguf package (Python 3.10 or later): pip install gguf") \
            from None
    if fmt not in FORMATS:
        raise SqlgptError(f"GGUF tensor format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if model.tokenizer.kind not in ("bpe", "hf"):
        raise SqlgptError(f"GGUF export needs a byte-level BPE tokenizer (llama.cpp has no "
                          f"{model.tokenizer.kind} tokenizer)")
    arch, kind = model.arch, gguf_arch(model.arch)
    if kind == GPT2 and arch.mlp != "gelu":
        raise SqlgptError(f"llama.cpp's gpt2 always uses GELU; this model's MLP is {arch.mlp} "
                          f"(export it with --format hf)")
    tensors = gguf_tensors(arch, model.state_dict_view())
    if arch.rope_scaling == "llama3":  # as llama.cpp's converter writes it: each pair's divisor
        plain = replace(arch, rope_scaling="none")
        tensors[ROPE_FREQS] = (rope_frequencies(plain) / rope_frequencies(arch)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), kind)
    _metadata(writer, gguf, arch, kind, fmt)
    _tokenizer(writer, gguf, model.tokenizer)
    writer.add_chat_template(model.chat_template or DEFAULT_TEMPLATE)
    write_tensors(writer, gguf, tensors, fmt)
    return len(tensors)


def write_tensors(writer, gguf, tensors, fmt):
    """Every tensor ({name: float32 array}) into writer in fmt: matrices as
    f16, or as Q8_0/Q4_0 blocks where their rows split into whole blocks;
    vectors (and other matrices) as float32. Then the file is written."""
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.ndim == 2 and fmt == "f16":
            writer.add_tensor(name, value.astype(np.float16))
        elif value.ndim == 2 and fmt in qtypes and value.shape[1] % Q8_BLOCK == 0:
            writer.add_tensor(name, gguf.quants.quantize(value, qtypes[fmt]),
                              raw_dtype=qtypes[fmt])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _metadata(writer, gguf, arch, kind, fmt):
    writer.add_name("sqlgpt model")
    writer.add_context_length(arch.seq_len)
    writer.add_embedding_length(arch.embed_dim)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(arch.hidden_dim)
    writer.add_head_count(arch.num_heads)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt])
    if kind in (LLAMA, QWEN2):
        writer.add_head_count_kv(arch.n_kv_heads)
        writer.add_rope_freq_base(arch.rope_theta)
        writer.add_rope_dimension_count(arch.head_dim)
        if arch.head_size:  # llama.cpp's default is embedding_length / head_count
            writer.add_key_length(arch.head_dim)
            writer.add_value_length(arch.head_dim)
        if arch.rope_scaling == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(arch.rope_factor)
        if arch.rope_scaling == "llama3":  # the divisors are rope_freqs.weight
            writer.add_rope_scaling_orig_ctx_len(arch.rope_original_context)
        writer.add_layer_norm_rms_eps(arch.norm_eps)
        writer.add_vocab_size(arch.n_vocab)
    else:
        writer.add_layer_norm_eps(arch.norm_eps)


def _tokenizer(writer, gguf, tokenizer):
    """llama.cpp's BPE vocabulary: each id's byte-level string, the merges,
    the special ids. Its pre-tokenizer is "default" (llama.cpp has no
    pattern of sqlgpt's), so text it splits itself may part from sqlgpt's
    ids at punctuation and digits; ids given directly are the same."""
    import json

    from tokenizers import Tokenizer as Library
    definition = tokenizer.state()["tokenizer_json"]
    spec, library = json.loads(definition), Library.from_str(definition)
    tokens = [library.id_to_token(i) for i in range(tokenizer.n_ids)]
    specials = {i for i, raw in enumerate(tokenizer._raws) if raw is None}
    writer.add_tokenizer_model("gpt2")
    # GPT-2's own byte-level regex (an imported hf tokenizer's) is llama.cpp's "gpt-2"
    gpt2_regex = tokenizer.kind == "hf" and (spec.get("pre_tokenizer") or {}).get(
        "type") == "ByteLevel" and spec["pre_tokenizer"].get("use_regex", True)
    writer.add_tokenizer_pre("gpt-2" if gpt2_regex else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in spec["model"]["merges"]])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if getattr(tokenizer, f"{role}_id") is not None:
            add(getattr(tokenizer, f"{role}_id"))
    writer.add_add_bos_token(False)
