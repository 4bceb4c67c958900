"""The model and its file, declared once for every language that reads them.

This module is pure data (it imports nothing of sqlgpt): Python's
architecture table, store and tokenizers read it, and build_ext.py loads it
by path and generates csrc's `contract.h` from it, so the loadable SQLite
extension's config reading, presence and shape checks, placement, row
layouts, limits and prefix rules are loops over the same table. A fact
added here reaches both loaders; nothing else decides which tensors a model
has or where their rows live.

Dimension symbols (shapes): C = embed_dim, F = the MLP's hidden size,
Q = query heads x head size (C unless head_size says otherwise), KV = kv heads x head size, V = n_vocab, T = seq_len, L = a classifier's labels. A shape of one symbol
is a vector (stored as one row); two are a matrix (in, out): y = x @ W.

Presence rules ("when"): a tuple of alternatives, any of which makes the
tensor present; an alternative is a tuple of atoms, all of which must hold.
An atom is a boolean config field (`bias`), its negation (`!tie_weights`),
or a choice (`norm=layernorm`). () is never; ((),) is always.
"""

# ---- the file ----
APPLICATION_ID = 0x53514C47  # "SQLG": PRAGMA application_id of a sqlgpt file
SCHEMA_VERSION = 6           # PRAGMA user_version this sqlgpt writes
# the oldest version whose weight tables both loaders read as they are
# (version 2 added the norms table and the architecture keys)
OLDEST_READABLE_SCHEMA = 2

# Where each tensor's rows live: table -> its key columns before the row
# index (the last key column). A block's tensors are in `layers` by (layer,
# component); the others by their name in one of the model tables.
WEIGHT_TABLES = {
    "embeddings": ("type", "position"),
    "layers": ("layer", "component", "i"),
    "head": ("i",),
    "norms": ("name", "i"),
    "classifier": ("name", "i"),
}
# the schema version that added a weight table (the others are in every version)
WEIGHT_TABLE_SINCE = {"norms": 2, "classifier": 5}
MODEL_TENSOR_TABLES = {"wte": "embeddings", "wpe": "embeddings", "head": "head",
                       "lnf_w": "norms", "lnf_b": "norms", "cls_w": "classifier",
                       "cls_b": "classifier"}

# A weight row: its data as little-endian float32, then Adam's two moments
# of the same length, and crc = zlib's CRC-32 of data || m || v. The other
# layouts of the same columns:
ROW_LAYOUTS = {
    "full": "data, m and v of cols float32 each (a model that can resume training)",
    # sqlgpt compact / merge: no moments, so crc is the CRC-32 of data alone
    "compacted": "data of cols float32, m and v empty",
}
# How an import's tensor may be stored instead of float32 rows (the
# tensor_formats table, since version 6), with the bytes each value takes:
# half formats as rows of cols 2-byte values (m and v empty, crc over data);
# integer formats as no rows at all, their values being the quantized copy's
# of those bits (a tied wte's are the head's rows).
TENSOR_FORMATS = {"f16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
# int8 / int4 copies (the quantized table): groups of this many inputs
QUANT_GROUPS = (32, 64)
# the formats a model's matrices decode in (the kernel's PRECISION_* in this
# order): float32; rounded to bfloat16 or to IEEE half (an F16 file's own
# values) for half the bytes; the stored int8 / int4 copies
PRECISIONS = ("fp32", "bf16", "int8", "int4", "f16")

# ---- a model inside an app's database (--prefix) ----
PREFIX_MAX = 32               # characters, letters/digits/_ starting with a letter
# sqlgpt's SQL names its tables after these words; a prefix is put there
PREFIX_KEYWORDS = ("FROM", "INTO", "UPDATE", "JOIN", "TABLE", "VIEW", "EXISTS")

# keys every stored config must have (schema version 1 had these too); a
# file that predates any other key gets arch.ArchConfig's default for it
REQUIRED_CONFIG_KEYS = ("vocab_size", "embed_dim", "num_heads", "num_layers", "seq_len")

# ---- the architecture config: field -> (kind, low, high) or (kind, choices) ----
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
MLPS = ("relu", "gelu", "swiglu")
# how rope's frequencies are stretched for a longer context: none; linear
# (each divided by rope_factor); llama3 (llama 3.1's rule: wavelengths
# longer than rope_original_context / rope_low_freq divided by rope_factor,
# shorter than rope_original_context / rope_high_freq kept, a blend between)
ROPE_SCALINGS = ("none", "linear", "llama3")
INITS = ("lua", "normal")
# how a classifier reads a sequence: its last position's final hidden state,
# or the mean of all its positions'
POOLS = ("last", "mean")
MAX_LABELS = 65536
SWIGLU_MULTIPLE = 32  # llama's hidden-size rule rounds up to this
ARCH_FIELDS = {
    "n_vocab": ("int", 1, 10**7),
    "embed_dim": ("int", 1, 16384),
    "num_heads": ("int", 1, 16384),
    "head_size": ("int", 0, 16384),    # 0: embed_dim / num_heads
    "kv_heads": ("int", 0, 16384),     # and at most num_heads
    "num_layers": ("int", 1, 1024),
    "seq_len": ("int", 1, 65536),
    "ffn_dim": ("int", 0, 2**20),
    "norm": ("choice", NORMS),
    "norm_affine": ("bool",),
    "norm_eps": ("float", 0.0, 1.0),     # open interval
    "pos": ("choice", POSITIONS),
    "rope_theta": ("float", 1.0, 1e30),  # open below
    "rope_scaling": ("choice", ROPE_SCALINGS),
    "rope_factor": ("float", 0.0, 1e6),
    "rope_low_freq": ("float", 0.0, 1e6),
    "rope_high_freq": ("float", 0.0, 1e6),
    "rope_original_context": ("int", 0, 2**24),
    "mlp": ("choice", MLPS),
    "bias": ("bool",),
    "qkv_bias": ("bool",),
    "tie_weights": ("bool",),
    "final_norm": ("bool",),
    "num_labels": ("int", 0, MAX_LABELS),  # a classifier's labels (0: a language model)
    "pool": ("choice", POOLS),
}

# ---- the tensors ----
ALWAYS = ((),)
# a block's components, in storage order: name (also the field of the
# kernel's LayerTensors), shape, when present, Hugging Face's name for a
# gpt2-family and a llama-family checkpoint, GGUF's, and the part of a
# fused tensor (GPT-2's c_attn holds [q | k | v])
LAYER_COMPONENTS = (
    ("ln1_w", ("C",), (("norm_affine",),),
     "ln_1.weight", "input_layernorm.weight", "attn_norm.weight", None),
    ("ln1_b", ("C",), (("norm_affine", "norm=layernorm", "bias"),),
     "ln_1.bias", None, "attn_norm.bias", None),
    ("q", ("C", "Q"), ALWAYS,
     "attn.c_attn.weight", "self_attn.q_proj.weight", "attn_q.weight", 0),
    ("q_b", ("Q",), (("bias",), ("qkv_bias",)),
     "attn.c_attn.bias", "self_attn.q_proj.bias", "attn_q.bias", 0),
    ("k", ("C", "KV"), ALWAYS,
     "attn.c_attn.weight", "self_attn.k_proj.weight", "attn_k.weight", 1),
    ("k_b", ("KV",), (("bias",), ("qkv_bias",)),
     "attn.c_attn.bias", "self_attn.k_proj.bias", "attn_k.bias", 1),
    ("v", ("C", "KV"), ALWAYS,
     "attn.c_attn.weight", "self_attn.v_proj.weight", "attn_v.weight", 2),
    ("v_b", ("KV",), (("bias",), ("qkv_bias",)),
     "attn.c_attn.bias", "self_attn.v_proj.bias", "attn_v.bias", 2),
    ("proj", ("Q", "C"), ALWAYS,
     "attn.c_proj.weight", "self_attn.o_proj.weight", "attn_output.weight", None),
    ("proj_b", ("C",), (("bias",),),
     "attn.c_proj.bias", "self_attn.o_proj.bias", "attn_output.bias", None),
    ("ln2_w", ("C",), (("norm_affine",),),
     "ln_2.weight", "post_attention_layernorm.weight", "ffn_norm.weight", None),
    ("ln2_b", ("C",), (("norm_affine", "norm=layernorm", "bias"),),
     "ln_2.bias", None, "ffn_norm.bias", None),
    ("gate", ("C", "F"), (("mlp=swiglu",),),
     None, "mlp.gate_proj.weight", "ffn_gate.weight", None),
    ("gate_b", ("F",), (("mlp=swiglu", "bias"),),
     None, "mlp.gate_proj.bias", "ffn_gate.bias", None),
    ("fc1", ("C", "F"), ALWAYS,
     "mlp.c_fc.weight", "mlp.up_proj.weight", "ffn_up.weight", None),
    ("fc1_b", ("F",), (("bias",),),
     "mlp.c_fc.bias", "mlp.up_proj.bias", "ffn_up.bias", None),
    ("fc2", ("F", "C"), ALWAYS,
     "mlp.c_proj.weight", "mlp.down_proj.weight", "ffn_down.weight", None),
    ("fc2_b", ("C",), (("bias",),),
     "mlp.c_proj.bias", "mlp.down_proj.bias", "ffn_down.bias", None),
)
# the model's own tensors (fields of ModelTensors), in storage order; the
# blocks come between lnf's predecessors and it: wte, wpe, blocks, lnf_w,
# lnf_b, head, and a classifier's cls_w, cls_b.
MODEL_COMPONENTS = (
    ("wte", ("V", "C"), ALWAYS,
     "transformer.wte.weight", "model.embed_tokens.weight", "token_embd.weight", None),
    ("wpe", ("T", "C"), (("pos=learned",),),
     "transformer.wpe.weight", None, "position_embd.weight", None),
    ("lnf_w", ("C",), (("final_norm", "norm_affine"),),
     "transformer.ln_f.weight", "model.norm.weight", "output_norm.weight", None),
    ("lnf_b", ("C",), (("final_norm", "norm_affine", "norm=layernorm", "bias"),),
     "transformer.ln_f.bias", None, "output_norm.bias", None),
    ("head", ("C", "V"), ALWAYS,
     "lm_head.weight", "lm_head.weight", "output.weight", None),
    # a classifier's head on the pooled final hidden state (no exported name)
    ("cls_w", ("C", "L"), (("num_labels",),), None, None, None, None),
    ("cls_b", ("L",), (("num_labels",),), None, None, None, None),
)
# llama.cpp's name of a tensor that fuses q, k and v (GPT-2's c_attn)
GGUF_FUSED_QKV = "attn_qkv"
MODEL_BEFORE_LAYERS = ("wte", "wpe")  # the rest follow the blocks
# a tensor that, where the flag is set, is another's data transposed and has
# no rows of its own
TIES = {"head": ("tie_weights", "wte")}
# tensors read by row (the embeddings), never multiplied: the decoder keeps
# them as they are stored, with no panels or integer copies
LOOKUP_TABLES = ("wte", "wpe")

# ---- tokenizers ----
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3 for char, byte and bpe
TOKENIZER_KINDS = ("word", "char", "byte", "bpe")  # what sqlgpt builds
IMPORTED_TOKENIZER_KINDS = ("hf",)  # what only comes with an imported model
# The pre-tokenizer patterns an imported (hf) tokenizer may split by before
# its byte-level step: the real models' own, each linear in the text. Any
# other pattern is refused at import and at load, since a pattern is code:
# one like `.(?=.*Q)|.` makes encoding quadratic.
PRETOKENIZER_PATTERNS = {
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama-3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "sqlgpt": r" ?[^ \t\n\x0b\x0c\r]+| +(?![^ \t\n\x0b\x0c\r])|[\t\n\x0b\x0c\r]",
}


# ---- chat templates the extension renders without a Jinja engine (each a
# fixed text it recognises; sqlgpt.chat.template renders them and any other) ----
CHAT_TEMPLATES = {
    # sqlgpt's default, on the specials every sqlgpt tokenizer has: a message
    # is <bos>ROLE\nCONTENT<eos>; a reply is prompted by <bos>assistant\n
    "sqlgpt": (
        "{% for message in messages %}"
        "{{ bos_token }}{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
        "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"),
    # ChatML: <|im_start|>ROLE\nCONTENT<|im_end|>\n, prompted by <|im_start|>assistant\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}
CHAT_ROLES = ("system", "user", "assistant")


def holds(when, config):
    """Whether a presence rule holds for config (an object with the
    ARCH_FIELDS as attributes)."""
    return any(all(_atom(atom, config) for atom in alternative) for alternative in when)


def _atom(atom, config):
    if atom.startswith("!"):
        return not getattr(config, atom[1:])
    field, _, choice = atom.partition("=")
    return getattr(config, field) == choice if choice else bool(getattr(config, field))
