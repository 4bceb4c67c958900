"""What a model is, as data: the architecture config, the presets, and the
tensor table that init, storage, decoding, the optimizer's groups and
export all read. Nothing else in sqlgpt decides which tensors exist or
parses a parameter's name.

Weights are (in, out): y = x @ W. Vectors (norm gains, biases) are 1-D and
stored as one row.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

from .. import contract
from ..contract import INITS, SWIGLU_MULTIPLE
from ..errors import SqlgptError

INIT_STD = 0.02       # GPT-2's and llama's normal init


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
    num_heads: int = 8        # must divide embed_dim unless head_size is set
    head_size: int = 0        # each head's width (0: embed_dim / num_heads)
    kv_heads: int = 0         # key/value heads for grouped-query attention (0: num_heads)
    num_layers: int = 6
    seq_len: int = 256        # context length (also the rows of a learned wpe)
    norm: str = "layernorm"   # or rmsnorm (llama)
    norm_affine: bool = False  # a learned gain (and a bias for layernorm with bias)
    norm_eps: float = 1e-5
    pos: str = "learned"      # learned, sinusoidal (fixed), rope (rotary), none
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none, linear or llama3 (contract.ROPE_SCALINGS)
    rope_factor: float = 1.0    # how much longer the context it stretches to
    rope_low_freq: float = 1.0  # llama3: transformers' low_freq_factor
    rope_high_freq: float = 4.0  # llama3: high_freq_factor
    rope_original_context: int = 0  # llama3: the context trained before scaling
    mlp: str = "relu"         # relu, gelu (tanh form, GPT-2), swiglu (llama)
    ffn_dim: int = 0          # MLP hidden size (0: 4 x embed_dim, or llama's rule for swiglu)
    bias: bool = False        # biases on every linear (and layernorm)
    qkv_bias: bool = False    # biases on q, k and v alone (Qwen2); implied by bias
    tie_weights: bool = False  # the head is wte transposed
    final_norm: bool = False  # a norm before the head (the original has none)
    init: str = "lua"         # lua (the original's uniform ranges) or normal (GPT-2's)
    num_labels: int = 0       # a classifier's labels (0: a language model)
    pool: str = "last"        # a classifier's pooling: last or mean (contract.POOLS)

    @property
    def head_dim(self):
        return self.head_size or self.embed_dim // self.num_heads

    @property
    def q_dim(self):
        """The attention's width: q's outputs and proj's inputs."""
        return self.num_heads * self.head_dim

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
        for name, (kind, *bounds) in contract.ARCH_FIELDS.items():
            if kind == "int":
                _check_int(name, getattr(self, name), *bounds)
            elif kind == "float":  # an open interval
                value, (low, high) = getattr(self, name), bounds
                if not (math.isfinite(value) and low < value < high):
                    raise SqlgptError(f"{name} must be a number in ({low:g}, {high:g}), "
                                      f"got {value}")
        _check_int("kv_heads", self.kv_heads, 0, self.num_heads)
        if not self.head_size and self.embed_dim % self.num_heads:
            raise SqlgptError(f"num_heads ({self.num_heads}) must divide embed_dim "
                              f"({self.embed_dim})")
        if self.num_heads % self.n_kv_heads:
            raise SqlgptError(f"kv_heads ({self.n_kv_heads}) must divide num_heads "
                              f"({self.num_heads})")
        choices = {name: bounds[0] for name, (kind, *bounds) in contract.ARCH_FIELDS.items()
                   if kind == "choice"}
        for name, allowed in (*choices.items(), ("init", INITS), ("preset", PRESETS)):
            if getattr(self, name) not in allowed:
                raise SqlgptError(f"{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise SqlgptError(f"rope needs an even head size, got {self.head_dim}")
        if self.rope_scaling == "llama3" and not (
                self.rope_original_context and self.rope_high_freq > self.rope_low_freq):
            raise SqlgptError("llama3 rope scaling needs rope_original_context and "
                              "rope_high_freq > rope_low_freq")
        if self.pos == "sinusoidal" and self.embed_dim % 2:
            raise SqlgptError("sinusoidal positions need an even embed_dim")
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


def _family(arch):
    """Which of transformers' models an architecture's names follow (0:
    GPT-2's, 1: llama's), the index into a component's Hugging Face names."""
    return 1 if arch.mlp == "swiglu" or arch.norm == "rmsnorm" else 0


def _lua_init(arch, component):
    """The original's uniform half-widths per matrix."""
    C = arch.embed_dim
    if component in ("fc1", "gate"):
        return math.sqrt(3.0 / C)                  # +-sqrt(3 / fan_in)
    if component == "fc2":
        return math.sqrt(3.0 / arch.hidden_dim)
    return 0.5 * math.sqrt(1.0 / C)                # q, k, v, proj


def _init(arch, component, shape):
    """(init, decay) of a tensor: norm gains ones and biases zeros, without
    weight decay; matrices and embeddings the preset's init, with it."""
    if len(shape) == 1:
        return ("ones" if component.endswith("_w") else "zeros", 0), False
    if arch.init == "normal":
        residual_std = INIT_STD / math.sqrt(2 * arch.num_layers)  # GPT-2's scaled projections
        return ("normal", residual_std if component in ("proj", "fc2") else INIT_STD), True
    if component == "wpe":
        return ("uniform", 0.005), True
    if component in ("wte", "head"):
        return ("uniform", 0.5 / math.sqrt(arch.embed_dim)), True
    return ("uniform", _lua_init(arch, component)), True


def _spec(arch, declared, layer=None):
    """The TensorSpec of one of contract's components, or None where the
    architecture has no such tensor."""
    name, symbols, when, hf_gpt2, hf_llama, gguf, part = declared
    tied = contract.TIES.get(name)
    if not contract.holds(when, arch):
        return None
    shape = tuple(dimension(arch, symbol) for symbol in symbols)
    family = _family(arch)
    hf = (hf_gpt2, hf_llama)[family]
    if layer is None:
        full, gguf_name = name, gguf
        hf_name = hf
    else:
        full, gguf_name = f"layers.{layer}.{name}", f"blk.{layer}.{gguf}"
        hf_name = hf and (f"transformer.h.{layer}.{hf}" if family == 0 else
                          f"model.layers.{layer}.{hf}")
    hf = (hf_name, part if family == 0 else None) if hf_name else None
    if tied and getattr(arch, tied[0]):
        return TensorSpec(full, shape, None, False, layer, name, tied[1], hf=hf,
                          gguf=(gguf_name, None))
    init, decay = _init(arch, name, shape)
    return TensorSpec(full, shape, init, decay, layer, name, hf=hf, gguf=(gguf_name, None))


def language_model(arch):
    """arch without a classifier's head: a classifier's base model."""
    return replace(arch, num_labels=0, pool="last")


def head_specs(arch):
    """A classifier's head tensors (none for a language model)."""
    return [s for s in tensor_table(arch) if s.name in ("cls_w", "cls_b")]


def dimension(arch, symbol):
    """The size a contract dimension symbol stands for."""
    return {"C": arch.embed_dim, "F": arch.hidden_dim, "Q": arch.q_dim, "KV": arch.kv_dim,
            "V": arch.n_vocab,
            "T": arch.seq_len, "L": arch.num_labels}[symbol]


def tensor_table(arch):
    """Every parameter tensor of arch, in storage (and initialization) order."""
    first = [c for c in contract.MODEL_COMPONENTS if c[0] in contract.MODEL_BEFORE_LAYERS]
    last = [c for c in contract.MODEL_COMPONENTS if c[0] not in contract.MODEL_BEFORE_LAYERS]
    specs = [_spec(arch, c) for c in first]
    for layer in range(arch.num_layers):
        specs += [_spec(arch, c, layer) for c in contract.LAYER_COMPONENTS]
    specs += [_spec(arch, c) for c in last]
    return [s for s in specs if s is not None]


def hf_to_gguf(arch, layer=None):
    """{Hugging Face name: llama.cpp name} of every tensor arch's family of
    checkpoints can hold (the exact equivalents an export adds included),
    from the contract's table; a fused tensor (GPT-2's c_attn) gets the
    fused GGUF name."""
    family = _family(arch)
    names = {}
    for declared, layers in ((contract.MODEL_COMPONENTS, [None]),
                             (contract.LAYER_COMPONENTS, range(arch.num_layers))):
        for name, _, _, hf_gpt2, hf_llama, gguf, part in declared:
            hf = (hf_gpt2, hf_llama)[family]
            if not hf:
                continue
            if part is not None and family == 0:
                gguf = f"{contract.GGUF_FUSED_QKV}.{gguf.rsplit('.', 1)[1]}"
            for layer in layers:
                if layer is None:
                    names[hf] = gguf
                else:
                    prefix = f"transformer.h.{layer}." if family == 0 else \
                        f"model.layers.{layer}."
                    names[prefix + hf] = f"blk.{layer}.{gguf}"
    return names


def stored_tensors(arch):
    """The tensors that own storage (a tied head is wte's data)."""
    return [s for s in tensor_table(arch) if s.tied_to is None]
