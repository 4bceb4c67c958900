"""GGUF files (llama.cpp, ollama, LM Studio) read into sqlgpt: the
architectures sqlgpt runs (llama, tied or not; qwen2; gpt2), tensors in
F32, F16, BF16, Q8_0 or Q4_0, and the tokenizer, special ids and chat
template from the file's metadata. Read with the `gguf` package, memory
mapped: a tensor is converted when its turn comes.

The file is turned into what a transformers directory would hold (a
config.json's fields, tensors under transformers' names and layouts: the
inverse of gguf_export), and from there into sqlgpt's model by the Hugging
Face import (sqlgpt.interop.hf), so both routes place every tensor alike.

Q8_0 and Q4_0 blocks are sqlgpt's own int8 and int4 groups of 32 (a scale
and 32 values; Q4_0's nibbles pair elements k and k + 16, as sqlgpt's do):
their rows are kept as the model's quantized copy without re-rounding,
only reordered where llama.cpp orders rows differently (llama's q and k
rows, interleaved for its rope; gpt2's fused q, k, v). The float32 weights
are the blocks' exact values. A matrix of another type in a quantized file
(llama.cpp keeps some in Q8_0 or F16) is quantized by sqlgpt for the copy.
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..contract import PRETOKENIZER_PATTERNS
from ..errors import SqlgptError
from ..model.arch import hf_to_gguf, tensor_table
from ..model.model import rope_frequencies
from ..model.quant import check_group, matrices, quantize
from . import hf
from .gguf_export import ROPE_FREQS

ARCHS = {"llama": hf.LLAMA, "qwen2": hf.QWEN2, "gpt2": hf.GPT2}
FLOATS = ("F32", "F16", "BF16")
BLOCKS = {"Q8_0": 8, "Q4_0": 4}  # llama.cpp's type -> sqlgpt's bits, in groups of 32
GROUP = 32
# llama.cpp's pre-tokenizer names -> the pattern sqlgpt runs for each
PRE_TOKENIZERS = {"gpt-2": "gpt-2", "default": "gpt-2", "llama-bpe": "llama-3",
                  "llama3": "llama-3", "smollm": "llama-3", "qwen2": "qwen2"}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # gguf's token types
ADDED = (UNKNOWN, CONTROL, USER_DEFINED)  # the tokens that are the library's added tokens


def read_gguf(path):
    """(arch, {name: float32 array}, tokenizer, quantized, extras) of a GGUF
    file: quantized is (bits, group, {matrix name: (q, scales)}) for a
    Q8_0/Q4_0 file, else None; extras holds the chat template, if any."""
    reader = _open(path)
    meta = Metadata(reader, path)
    kind = meta.text("general.architecture")
    if kind not in ARCHS:
        raise SqlgptError(f"{path}: GGUF architecture {kind!r} is not one sqlgpt runs "
                          f"({', '.join(ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    for t in tensors.values():
        if t.tensor_type.name not in FLOATS and t.tensor_type.name not in BLOCKS:
            raise SqlgptError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which sqlgpt "
                              f"does not read (F32, F16, BF16, Q8_0 or Q4_0: convert the model "
                              f"with llama.cpp's convert_hf_to_gguf.py --outtype q8_0)")
    config = _config(meta, kind, tensors)
    arch = _with_rope_freqs(hf._hf_arch(config), tensors, meta)
    names = {g: h for h, g in hf_to_gguf(arch).items()}
    weights = hf._sqlgpt_weights(arch, {names.get(n, n): _to_hf(arch, kind, n, _floats(t))
                                        for n, t in tensors.items() if n != ROPE_FREQS})
    tokenizer = _tokenizer(meta, arch)
    extras = {"chat_template": meta.get("tokenizer.chat_template")}
    return arch, weights, tokenizer, _quantized(arch, kind, tensors, weights), extras


def _open(path):
    if not Path(path).is_file():
        raise SqlgptError(f"{path} is not a file")
    try:
        import gguf
    except ImportError:
        raise SqlgptError("GGUF import needs the gguf package (Python 3.10 or later): pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError,
            OSError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SqlgptError(f"{path} is not a GGUF file sqlgpt can read: {first[:200]}") from None


class Metadata:
    """The file's key-value pairs, read with one-line errors."""

    def __init__(self, reader, path):
        self.fields, self.path = reader.fields, path

    def get(self, key, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError, TypeError):
            raise SqlgptError(f"{self.path}: metadata {key} cannot be read") from None
        return value

    def text(self, key):
        value = self.get(key)
        if not isinstance(value, str):
            raise SqlgptError(f"{self.path}: metadata {key} is missing or not text")
        return value

    def number(self, key, default=None):
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not np.isfinite(value):
            raise SqlgptError(f"{self.path}: metadata {key} is missing or not a number")
        # the shortest decimal of a float32 (GGUF's floats are): 1e-05, not 9.99999974e-06
        return float(str(np.float32(value))) if isinstance(value, float) else value


def _config(meta, kind, tensors):
    """config.json's fields for the file's model."""
    key = lambda name: f"{kind}.{name}"  # noqa: E731
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else meta.number(key("vocab_size"))
    common = {"vocab_size": vocab,
              "tie_word_embeddings": "output.weight" not in tensors or _same(
                  tensors["output.weight"], tensors.get("token_embd.weight"))}
    embed, heads = meta.number(key("embedding_length")), meta.number(key("attention.head_count"))
    if kind == hf.GPT2:
        return {**common, "model_type": hf.GPT2, "n_embd": embed, "n_head": heads,
                "n_layer": meta.number(key("block_count")),
                "n_positions": meta.number(key("context_length")),
                "n_inner": meta.number(key("feed_forward_length")),
                "layer_norm_epsilon": meta.number(key("attention.layer_norm_epsilon"), 1e-5)}
    rope = {"rope_type": "default", "rope_theta": meta.number(key("rope.freq_base"), 10000.0)}
    scaling, factor = meta.get(key("rope.scaling.type"), "none"), \
        meta.number(key("rope.scaling.factor"), 1.0)
    if scaling == "linear" and factor != 1.0:
        rope.update(rope_type="linear", factor=factor)
    elif scaling not in ("none", "linear", None) and factor != 1.0:
        raise SqlgptError(f"{meta.path}: rope scaling {scaling!r} is not supported (linear "
                          f"and llama 3's rope_freqs are)")
    return {**common, "model_type": kind, "hidden_size": embed, "num_attention_heads": heads,
            "num_key_value_heads": meta.number(key("attention.head_count_kv"), heads),
            "head_dim": meta.number(key("attention.key_length"), embed // heads),
            "num_hidden_layers": meta.number(key("block_count")),
            "max_position_embeddings": meta.number(key("context_length")),
            "intermediate_size": meta.number(key("feed_forward_length")),
            "rms_norm_eps": meta.number(key("attention.layer_norm_rms_epsilon"), 1e-6),
            "rope_parameters": rope, "attention_bias": False}


# llama 3.1's rope settings, which its converter writes as rope_freqs.weight
# (each pair's frequency divisor) and not as metadata
LLAMA3_ROPE = dict(rope_low_freq=1.0, rope_high_freq=4.0, rope_original_context=8192)


def _with_rope_freqs(arch, tensors, meta):
    """arch with the llama 3 rope scaling a rope_freqs.weight tensor holds:
    divisors that llama 3.1's rule with its settings gives for their
    largest as the factor, or a one-line refusal."""
    t = tensors.get(ROPE_FREQS)
    if t is None:
        return arch
    divisors = _floats(t).reshape(-1).astype(np.float64)
    if divisors.shape != (arch.head_dim // 2,) or not np.all(np.isfinite(divisors)) or \
            divisors.min() <= 0:
        raise SqlgptError(f"{meta.path}: rope_freqs.weight is not {arch.head_dim // 2} positive "
                          f"numbers")
    if np.all(divisors == 1.0):
        return arch
    original = meta.number(f"{meta.text('general.architecture')}.rope.scaling."
                           f"original_context_length", LLAMA3_ROPE["rope_original_context"])
    scaled = replace(arch, rope_scaling="llama3", rope_factor=float(divisors.max()),
                     **{**LLAMA3_ROPE, "rope_original_context": int(original)}).validate()
    plain = replace(arch, rope_scaling="none")
    if not np.allclose(rope_frequencies(plain) / rope_frequencies(scaled), divisors,
                       rtol=1e-4):
        raise SqlgptError(f"{meta.path}: rope_freqs.weight is not llama 3.1's rope scaling "
                          f"(low 1, high 4, original context {original}): sqlgpt cannot turn "
                          f"by it")
    return scaled


def _same(a, b):
    """Whether two tensors hold the same values (gpt2 files repeat the
    embedding as output.weight, as its converter writes them)."""
    return b is not None and a.tensor_type == b.tensor_type and \
        a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def _floats(t):
    """A tensor's float32 values in numpy's order (out, in)."""
    import gguf
    kind = t.tensor_type.name
    shape = tuple(int(n) for n in reversed(t.shape))
    if kind == "F32":
        values = np.asarray(t.data, dtype=np.float32)
    elif kind == "F16":
        values = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    try:
        return values.reshape(shape)
    except ValueError:
        raise SqlgptError(f"tensor {t.name} holds {values.size} values, its shape says "
                          f"{shape}") from None


def _to_hf(arch, kind, name, value):
    """A llama.cpp tensor in transformers' layout (gguf_export's inverse)."""
    if kind == hf.GPT2 and value.ndim == 2 and name not in ("token_embd.weight",
                                                              "position_embd.weight",
                                                              "output.weight"):
        return value.T  # (out, in) -> Conv1D's (in, out)
    if kind == hf.LLAMA and name.endswith(("attn_q.weight", "attn_q.bias")):
        return rope_halves(value, arch.num_heads)
    if kind == hf.LLAMA and name.endswith(("attn_k.weight", "attn_k.bias")):
        return rope_halves(value, arch.n_kv_heads)
    return value


def rope_halves(w, heads):
    """q or k rows from llama.cpp's interleaved rope pairs (2i, 2i + 1) to
    rotate_half's (i, i + head/2): gguf_export.rope_interleaved's inverse."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _row_order(arch, kind, name, rows):
    """The permutation of a llama.cpp matrix's rows (outputs) that gives
    transformers' order: _to_hf on row indices."""
    return _to_hf(arch, kind, name, np.arange(rows)) if kind == hf.LLAMA else np.arange(rows)


def _quantized(arch, kind, tensors, weights):
    """(bits, group, {name: (q, scales)}) kept from the file's Q8_0/Q4_0 blocks
    (matrices of other types quantized here), or None for a float file."""
    to_gguf = hf_to_gguf(arch)
    types = [t.tensor_type.name for t in tensors.values() if len(t.shape) == 2]
    counts = {k: types.count(k) for k in BLOCKS}
    if not any(counts.values()):
        return None
    bits = BLOCKS[max(counts, key=counts.get)]
    try:
        check_group(arch, GROUP)
    except SqlgptError as e:  # sqlgpt's integer copy holds every matrix in groups of 32
        raise SqlgptError(f"the file is {'Q8_0' if bits == 8 else 'Q4_0'}, but sqlgpt's int"
                          f"{bits} copy cannot hold it: {e}") from None
    blocks = {}
    for spec in matrices(arch):
        source = _block_source(arch, spec, to_gguf, tensors)
        found = source and _raw_blocks(source[0], bits)
        if found:
            q, scales = found
            order = _row_order(arch, kind, source[0].name, q.shape[0])[source[1]]
            blocks[spec.name] = (np.ascontiguousarray(q[order]),
                                 np.ascontiguousarray(scales[order]))
        else:
            w = weights[spec.tied_to].T if spec.tied_to else weights[spec.name]
            blocks[spec.name] = quantize(w, bits, GROUP)
    return bits, GROUP, blocks


def _block_source(arch, spec, to_gguf, tensors):
    """(llama.cpp tensor, its rows) that hold a quantized matrix's rows:
    the head's are the embedding's where tied; gpt2's fused qkv holds q, k
    and v in turn. None where the table does not say."""
    if spec.tied_to:
        t = tensors.get("output.weight") or tensors.get("token_embd.weight")
        return (t, slice(None)) if t is not None else None
    name, part = spec.hf
    gguf_name = to_gguf.get(name) or to_gguf.get(f"transformer.{name}")
    t = tensors.get(gguf_name)
    if t is None:
        return None
    if part is None:
        return t, slice(None)
    start = sum(s.shape[1] for s in tensor_table(arch)
                if s.hf and s.hf[0] == name and s.layer == spec.layer and s.hf[1] is not None
                and s.hf[1] < part)
    return t, slice(start, start + spec.shape[1])


def _raw_blocks(t, bits):
    """(q, scales) of a Q8_0 (bits 8) or Q4_0 (bits 4) tensor's blocks, as
    sqlgpt's quantized rows, or None for a tensor of another type."""
    if BLOCKS.get(t.tensor_type.name) != bits:
        return None
    rows, width = int(t.shape[1]) if len(t.shape) > 1 else 1, int(t.shape[0])
    raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, width // GROUP, -1)
    scales = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    return raw[..., 2:].reshape(rows, -1).copy(), scales


def _tokenizer(meta, arch):
    """The model's tokenizer from the metadata, as the tokenizers library's
    definition: GPT-2-style byte-level BPE (tokenizer.ggml.model "gpt2":
    tokens and merges) or SentencePiece-style BPE with byte fallback
    ("llama": tokens and scores, merges derived from the scores)."""
    from ..data.tokenizers.hf import HFTokenizer
    model = meta.get("tokenizer.ggml.model")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if model is None or not isinstance(tokens, list):
        raise SqlgptError(f"{meta.path} holds no tokenizer (tokenizer.ggml.*): sqlgpt needs the "
                          f"model's")
    if len(set(tokens)) != len(tokens):
        raise SqlgptError(f"{meta.path}: its token list repeats a token")
    types = types if isinstance(types, list) and len(types) == len(tokens) else \
        [NORMAL] * len(tokens)
    if model == "gpt2":
        definition = _byte_level(meta, tokens)
    elif model == "llama":
        definition = _sentencepiece(meta, tokens, types)
    else:
        raise SqlgptError(f"{meta.path}: the {model!r} tokenizer is not one sqlgpt imports from "
                          f"GGUF ('gpt2': byte-level BPE; 'llama': SentencePiece-style BPE)")
    definition["added_tokens"] = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] != USER_DEFINED}
        for i, tok in enumerate(tokens) if types[i] in ADDED]
    roles = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            roles[role] = value
    tokenizer = HFTokenizer(json.dumps(definition, ensure_ascii=False), roles)
    if tokenizer.n_ids != arch.n_vocab:
        raise SqlgptError(f"{meta.path}: the tokenizer has {tokenizer.n_ids} ids, the model "
                          f"{arch.n_vocab}")
    return tokenizer


def _bpe_model(tokens, merges, **options):
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges, **options}


def _byte_level(meta, tokens):
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise SqlgptError(f"{meta.path}: llama.cpp's pre-tokenizer {pre!r} is not one sqlgpt "
                          f"runs ({', '.join(sorted(PRE_TOKENIZERS))})")
    merges = meta.get("tokenizer.ggml.merges") or []
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise SqlgptError(f"{meta.path}: tokenizer.ggml.merges is not a list of texts")
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZER_PATTERNS[PRE_TOKENIZERS[pre]]},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": _bpe_model(tokens, [m.split(" ", 1) for m in merges])}


def _sentencepiece(meta, tokens, types):
    """llama 2's tokenizer as its tokenizer.json has it: the merges of every
    token split into two tokens, by the merged token's score (highest
    first), ties in vocabulary order (as transformers' converters derive
    them); byte fallback to <0xXX> tokens; a "▁" prepended to every text,
    as llama.cpp and llama 2's own tokenizer.json do."""
    from ..data.tokenizers.hf import SPACE, SPM_NORMALIZER
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise SqlgptError(f"{meta.path}: a SentencePiece vocabulary needs a score per token "
                          f"(tokenizer.ggml.scores)")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for tok, score in zip(tokens, scores):
        local = [(tok[:k], tok[k:], score) for k in range(1, len(tok))
                 if tok[:k] in vocab and tok[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep their order
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    return {
        "version": "1.0", "truncation": None, "padding": None,
        # llama.cpp prepends a space to every text unless the file says not to
        "normalizer": {"type": "Sequence", "normalizers": SPM_NORMALIZER if meta.get(
            "tokenizer.ggml.add_space_prefix", True) else SPM_NORMALIZER[1:]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": _bpe_model(tokens, [[a, b] for a, b, _ in merges], byte_fallback=True,
                            fuse_unk=True, unk_token=tokens[unk] if isinstance(unk, int) and
                            0 <= unk < len(tokens) else None)}
