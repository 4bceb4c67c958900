"""What a model is, as data: the architecture config, the presets, and the
tensor table that init, storage, decoding, the optimizer's groups and
export all read. Nothing else in sqlgpt decides which tensors exist or
parses a parameter's name.

Weights are (in, out): y = x @ W. Vectors (norm gains, biases) are 1-D and
stored as one row.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import SqlgptError

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
MLPS = ("relu", "gelu", "swiglu")
INITS = ("lua", "normal")
INIT_STD = 0.02       # GPT-2's and llama's normal init
SWIGLU_MULTIPLE = 32  # llama's hidden-size rule rounds up to this (llama2.c's small models)


class StoredFields:
    """A dataclass stored as key/value rows of the config table."""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """From stored key/values (other keys ignored), each as its field's type."""
        known = {f.name: f.type for f in fields(cls)}
        return cls(**{k: typed(k, v, known[k]) for k, v in values.items() if k in known})


@dataclass
class ArchConfig(StoredFields):
    """The architecture alone (training settings live in train.TrainConfig).
    Defaults are the lua preset: the original script's model."""
    preset: str = "lua"
    n_vocab: int = 428        # token ids (rows of wte): the tokenizer's size
    embed_dim: int = 128
    num_heads: int = 8        # must divide embed_dim
    kv_heads: int = 0         # key/value heads for grouped-query attention (0: num_heads)
    num_layers: int = 6
    seq_len: int = 256        # context length (also the rows of a learned wpe)
    norm: str = "layernorm"   # or rmsnorm (llama)
    norm_affine: bool = False  # a learned gain (and a bias for layernorm with bias)
    norm_eps: float = 1e-5
    pos: str = "learned"      # learned, sinusoidal (fixed), rope (rotary), none
    rope_theta: float = 10000.0
    mlp: str = "relu"         # relu, gelu (tanh form, GPT-2), swiglu (llama)
    ffn_dim: int = 0          # MLP hidden size (0: 4 x embed_dim, or llama's rule for swiglu)
    bias: bool = False        # biases on every linear (and layernorm)
    tie_weights: bool = False  # the head is wte transposed
    final_norm: bool = False  # a norm before the head (the original has none)
    init: str = "lua"         # lua (the original's uniform ranges) or normal (GPT-2's)

    @property
    def head_dim(self):
        return self.embed_dim // self.num_heads

    @property
    def n_kv_heads(self):
        return self.kv_heads or self.num_heads

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @property
    def hidden_dim(self):
        """The MLP's hidden size: ffn_dim, else 4C, or for SwiGLU llama's
        2/3 of 4C (the same parameters as a 4C two-matrix MLP), rounded up."""
        if self.ffn_dim:
            return self.ffn_dim
        if self.mlp != "swiglu":
            return 4 * self.embed_dim
        hidden = int(2 * 4 * self.embed_dim / 3)
        return -(-hidden // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE

    def validate(self):
        """Raise SqlgptError for an architecture that cannot be built."""
        limits = {"n_vocab": 10**7, "embed_dim": 16384, "num_heads": 16384,
                  "num_layers": 1024, "seq_len": 65536}
        for name, limit in limits.items():
            _check_int(name, getattr(self, name), 1, limit)
        _check_int("kv_heads", self.kv_heads, 0, self.num_heads)
        _check_int("ffn_dim", self.ffn_dim, 0, 2**20)
        if self.embed_dim % self.num_heads:
            raise SqlgptError(f"num_heads ({self.num_heads}) must divide embed_dim "
                              f"({self.embed_dim})")
        if self.num_heads % self.n_kv_heads:
            raise SqlgptError(f"kv_heads ({self.n_kv_heads}) must divide num_heads "
                              f"({self.num_heads})")
        for name, allowed in (("norm", NORMS), ("pos", POSITIONS), ("mlp", MLPS),
                              ("init", INITS), ("preset", PRESETS)):
            if getattr(self, name) not in allowed:
                raise SqlgptError(f"{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise SqlgptError(f"rope needs an even head size, got {self.head_dim} "
                              f"(embed_dim / num_heads)")
        if self.pos == "sinusoidal" and self.embed_dim % 2:
            raise SqlgptError("sinusoidal positions need an even embed_dim")
        if not (math.isfinite(self.norm_eps) and 0 < self.norm_eps < 1):
            raise SqlgptError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise SqlgptError(f"rope_theta must be a number above 1, got {self.rope_theta}")
        return self



def _check_int(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SqlgptError(f"{name} must be an integer from {low} to {high:,}, got {value!r}")


def typed(key, value, kind):
    """A stored config value as its field's type, refusing lossy conversions
    (SQLite stores booleans as 0/1)."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind)
    ok = {int: isinstance(value, int) or (isinstance(value, float) and value.is_integer()),
          float: isinstance(value, (int, float)),
          str: isinstance(value, str),
          bool: value in (0, 1) and not isinstance(value, str)}[kind]
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise SqlgptError(f"config {key} has a bad value {value!r}")
    return kind(value)


# preset name -> ArchConfig fields it sets (the rest are the defaults above)
PRESETS = {
    # the original: parameter-free layernorm, learned positions, ReLU 4x, no
    # biases, untied head, no final norm, uniform init
    "lua": {},
    # GPT-2 / nanoGPT: layernorm with gain and bias, biases on every linear,
    # GELU, final layernorm, head tied to wte, normal(0.02) init
    "gpt2": dict(norm_affine=True, mlp="gelu", bias=True, tie_weights=True, final_norm=True,
                 init="normal"),
    # llama: RMSNorm with gain, rotary positions, SwiGLU, no biases, final
    # norm, untied head
    "llama": dict(norm="rmsnorm", norm_affine=True, pos="rope", mlp="swiglu",
                  final_norm=True, init="normal"),
}


def preset(name, **overrides):
    """The ArchConfig of a preset with some fields changed."""
    if name not in PRESETS:
        raise SqlgptError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return replace(ArchConfig(preset=name, **PRESETS[name]), **overrides)


# ---- the tensor table ----
@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor of a model.

    name: the stored and state_dict() name; layer/component place it in the
    kernel's structs (component is the field of LayerTensors, or of
    ModelTensors when layer is None); init: (kind, scale) with kind uniform
    (half-width), normal (std), ones or zeros; decay: whether AdamW's weight
    decay applies (matrices and embeddings, as nanoGPT); tied_to: the tensor
    whose data this one is (transposed), then it has no storage of its own;
    hf/gguf: the name other formats use, with a part index where that format
    fuses several of ours into one tensor (GPT-2's c_attn holds q, k, v)."""
    name: str
    shape: tuple
    init: tuple
    decay: bool
    layer: object = None
    component: str = ""
    tied_to: str = None
    hf: tuple = None
    gguf: tuple = None

    @property
    def rows(self):
        return self.shape[0] if len(self.shape) == 2 else 1

    @property
    def cols(self):
        return self.shape[-1]


# component -> (hf name for gpt2, hf name for llama, gguf name, part); a part
# indexes the fused tensor of GPT-2's checkpoints (c_attn = [q | k | v])
LAYER_NAMES = {
    "ln1_w": ("ln_1.weight", "input_layernorm.weight", "attn_norm.weight", None),
    "ln1_b": ("ln_1.bias", None, "attn_norm.bias", None),
    "q": ("attn.c_attn.weight", "self_attn.q_proj.weight", "attn_q.weight", 0),
    "q_b": ("attn.c_attn.bias", "self_attn.q_proj.bias", "attn_q.bias", 0),
    "k": ("attn.c_attn.weight", "self_attn.k_proj.weight", "attn_k.weight", 1),
    "k_b": ("attn.c_attn.bias", "self_attn.k_proj.bias", "attn_k.bias", 1),
    "v": ("attn.c_attn.weight", "self_attn.v_proj.weight", "attn_v.weight", 2),
    "v_b": ("attn.c_attn.bias", "self_attn.v_proj.bias", "attn_v.bias", 2),
    "proj": ("attn.c_proj.weight", "self_attn.o_proj.weight", "attn_output.weight", None),
    "proj_b": ("attn.c_proj.bias", "self_attn.o_proj.bias", "attn_output.bias", None),
    "ln2_w": ("ln_2.weight", "post_attention_layernorm.weight", "ffn_norm.weight", None),
    "ln2_b": ("ln_2.bias", None, "ffn_norm.bias", None),
    "gate": (None, "mlp.gate_proj.weight", "ffn_gate.weight", None),
    "gate_b": (None, "mlp.gate_proj.bias", "ffn_gate.bias", None),
    "fc1": ("mlp.c_fc.weight", "mlp.up_proj.weight", "ffn_up.weight", None),
    "fc1_b": ("mlp.c_fc.bias", "mlp.up_proj.bias", "ffn_up.bias", None),
    "fc2": ("mlp.c_proj.weight", "mlp.down_proj.weight", "ffn_down.weight", None),
    "fc2_b": ("mlp.c_proj.bias", "mlp.down_proj.bias", "ffn_down.bias", None),
}
GLOBAL_NAMES = {
    "wte": ("transformer.wte.weight", "model.embed_tokens.weight", "token_embd.weight"),
    "wpe": ("transformer.wpe.weight", None, "position_embd.weight"),
    "lnf_w": ("transformer.ln_f.weight", "model.norm.weight", "output_norm.weight"),
    "lnf_b": ("transformer.ln_f.bias", None, "output_norm.bias"),
    "head": ("lm_head.weight", "lm_head.weight", "output.weight"),
}


def _family(arch):
    """Which of transformers' models an architecture's names follow."""
    return 1 if arch.mlp == "swiglu" or arch.norm == "rmsnorm" else 0


def _lua_init(arch, component):
    """The original's uniform half-widths per matrix."""
    C = arch.embed_dim
    if component in ("fc1", "gate"):
        return math.sqrt(3.0 / C)                  # +-sqrt(3 / fan_in)
    if component == "fc2":
        return math.sqrt(3.0 / arch.hidden_dim)
    return 0.5 * math.sqrt(1.0 / C)                # q, k, v, proj


def _layer_specs(arch, layer):
    C, F, KV = arch.embed_dim, arch.hidden_dim, arch.kv_dim
    matrices = {"q": (C, C), "k": (C, KV), "v": (C, KV), "proj": (C, C),
                "gate": (C, F), "fc1": (C, F), "fc2": (F, C)}
    order = ["ln1_w", "ln1_b", "q", "q_b", "k", "k_b", "v", "v_b", "proj", "proj_b",
             "ln2_w", "ln2_b", "gate", "gate_b", "fc1", "fc1_b", "fc2", "fc2_b"]
    residual_std = INIT_STD / math.sqrt(2 * arch.num_layers)  # GPT-2's scaled projections
    family = _family(arch)
    specs = []
    for comp in order:
        base = comp[:-2] if comp.endswith(("_w", "_b")) else comp
        if base.startswith("ln"):
            if not arch.norm_affine or (comp.endswith("_b") and
                                        (arch.norm == "rmsnorm" or not arch.bias)):
                continue
            shape, init, decay = (C,), ("ones" if comp.endswith("_w") else "zeros", 0), False
        else:
            if base == "gate" and arch.mlp != "swiglu":
                continue
            if comp.endswith("_b"):
                if not arch.bias:
                    continue
                shape, init, decay = (matrices[base][1],), ("zeros", 0), False
            else:
                shape, decay = matrices[comp], True
                if arch.init == "lua":
                    init = ("uniform", _lua_init(arch, comp))
                else:
                    init = ("normal", residual_std if comp in ("proj", "fc2") else INIT_STD)
        hf_gpt2, hf_llama, gguf, part = LAYER_NAMES[comp]
        hf = (f"transformer.h.{layer}.{hf_gpt2}" if family == 0 and hf_gpt2 else
              f"model.layers.{layer}.{hf_llama}" if family == 1 and hf_llama else None)
        specs.append(TensorSpec(f"layers.{layer}.{comp}", shape, init, decay, layer, comp,
                                hf=(hf, part if family == 0 else None) if hf else None,
                                gguf=(f"blk.{layer}.{gguf}", None)))
    return specs


def _global_spec(arch, name, shape, init, decay, tied_to=None):
    hf = GLOBAL_NAMES[name][_family(arch)]
    return TensorSpec(name, shape, init, decay, None, name, tied_to,
                      hf=(hf, None) if hf else None, gguf=(GLOBAL_NAMES[name][2], None))


def tensor_table(arch):
    """Every parameter tensor of arch, in storage (and initialization) order."""
    C, V = arch.embed_dim, arch.n_vocab
    lua = arch.init == "lua"
    specs = [_global_spec(arch, "wte", (V, C),
                          ("uniform", 0.5 / math.sqrt(C)) if lua else ("normal", INIT_STD), True)]
    if arch.pos == "learned":
        specs.append(_global_spec(arch, "wpe", (arch.seq_len, C),
                                  ("uniform", 0.005) if lua else ("normal", INIT_STD), True))
    for layer in range(arch.num_layers):
        specs += _layer_specs(arch, layer)
    if arch.final_norm and arch.norm_affine:
        specs.append(_global_spec(arch, "lnf_w", (C,), ("ones", 0), False))
        if arch.norm == "layernorm" and arch.bias:
            specs.append(_global_spec(arch, "lnf_b", (C,), ("zeros", 0), False))
    if arch.tie_weights:
        specs.append(_global_spec(arch, "head", (C, V), None, False, tied_to="wte"))
    else:
        specs.append(_global_spec(arch, "head", (C, V),
                                  ("uniform", 0.5 / math.sqrt(C)) if lua else ("normal", INIT_STD),
                                  True))
    return specs


def stored_tensors(arch):
    """The tensors that own storage (a tied head is wte's data)."""
    return [s for s in tensor_table(arch) if s.tied_to is None]
