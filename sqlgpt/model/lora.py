"""LoRA adapters (Hu et al. 2021, with PEFT's defaults): a frozen base model
plus, on chosen block matrices W (in, out), a low-rank A (in, rank) and B
(rank, out) trained in its place, y = x @ W + (alpha / rank) (drop(x) @ A) @ B.

The adapters are tensors like any other: rows of the tensor table
(`layers.3.q.lora_a`), stored in the layers table of the fine-tune's own
database with their Adam moments, which names its base by path and by a
hash of the base's weights. Training runs them in the C forward and
backward (csrc/model.c); decoding folds them into the base once (merged).
"""
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._kernel import ffi
from .arch import StoredFields, TensorSpec
from .dropout import shifted_seed
from ..errors import SqlgptError
from .tensor import aligned_zeros

# the kernel's sites, in its order (Lora.seeds, model.c's SITE_*)
SITES = ("q", "k", "v", "proj", "gate", "fc1", "fc2")
KEY_PREFIX = "lora_"  # LoraConfig's keys in the config table: lora_rank, ...
GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class LoraConfig(StoredFields):
    """A fine-tune's adapters and its base. Defaults: the LoRA paper's and
    PEFT's (rank 8, alpha 16, the attention's q and v, no dropout)."""
    rank: int = 8
    alpha: float = 16.0
    targets: str = "q,v"   # comma-separated sites of the tensor table
    dropout: float = 0.0   # on each adapter's input, in training
    base: str = ""         # the base database, relative to the fine-tune's directory
    base_sha256: str = ""  # base_digest of the base's weights when the fine-tune began

    @property
    def scale(self):
        return self.alpha / self.rank

    @property
    def sites(self):
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self, arch):
        """Raise SqlgptError unless these adapters fit arch."""
        width = arch.embed_dim
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or \
                not 1 <= self.rank <= width:
            raise SqlgptError(f"--lora-rank must be an integer from 1 to the model's width "
                              f"{width}, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise SqlgptError(f"--lora-alpha must be a number above 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise SqlgptError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        known = adaptable(arch)
        if not self.sites:
            raise SqlgptError(f"--lora-targets names no matrix (known: {', '.join(known)})")
        unknown = [t for t in self.sites if t not in known]
        if unknown:
            raise SqlgptError(f"unknown --lora-targets {', '.join(unknown)} for the "
                              f"{arch.preset} model (known: {', '.join(known)})")
        if len(set(self.sites)) != len(self.sites):
            raise SqlgptError(f"--lora-targets names a matrix twice: {self.targets}")
        self.targets = ",".join(self.sites)
        return self

    def rows(self):
        return [(KEY_PREFIX + k, v) for k, v in self.to_dict().items()]

    @classmethod
    def from_rows(cls, values):
        """The LoraConfig a config table holds, or None for a plain model."""
        found = {k[len(KEY_PREFIX):]: v for k, v in values.items() if k.startswith(KEY_PREFIX)}
        return cls.from_dict(found) if found else None


def adaptable(arch):
    """The sites arch has (gate only with SwiGLU)."""
    return [s for s in SITES if s != "gate" or arch.mlp == "swiglu"]


def _site_shape(arch, site):
    C, F, Q, KV = arch.embed_dim, arch.hidden_dim, arch.q_dim, arch.kv_dim
    return {"q": (C, Q), "k": (C, KV), "v": (C, KV), "proj": (Q, C), "gate": (C, F),
            "fc1": (C, F), "fc2": (F, C)}[site]


def lora_tensors(arch, lora):
    """The adapters' rows of the tensor table: per layer and target, A (in,
    rank) uniform in +-1/sqrt(in) (PEFT's kaiming_uniform(a=sqrt(5)) on its
    (rank, in) lora_A) and B (rank, out) zero, so training starts from the
    base exactly. Both decay with the matrices (AdamW)."""
    specs = []
    for layer in range(arch.num_layers):
        for site in lora.sites:
            fan_in, fan_out = _site_shape(arch, site)
            for part, shape, init in (("lora_a", (fan_in, lora.rank),
                                       ("uniform", 1.0 / math.sqrt(fan_in))),
                                      ("lora_b", (lora.rank, fan_out), ("zeros", 0))):
                specs.append(TensorSpec(f"layers.{layer}.{site}.{part}", shape, init, True,
                                        layer, f"{site}.{part}"))
    return specs


def base_digest(params):
    """SHA-256 of a model's weights (every stored tensor's float32 data, in
    table order): what a fine-tune checks its base against."""
    digest = hashlib.sha256()
    for t in params:
        digest.update(np.ascontiguousarray(t.data, dtype="<f4").tobytes())
    return digest.hexdigest()


def base_reference(base_path, tuned_path):
    """How a fine-tune names its base: relative to its own directory (the
    pair can move together), absolute where no relative path exists."""
    base = Path(base_path).resolve()
    try:
        return os.path.relpath(base, Path(tuned_path).resolve().parent)
    except ValueError:  # another drive
        return str(base)


def base_path(lora, tuned_path):
    """The base database a fine-tune at tuned_path names."""
    return (Path(tuned_path).resolve().parent / lora.base).resolve()


def merged(model):
    """{name: float32 array} of model's weights with every adapter folded in,
    W + (alpha / rank) A @ B (a plain model's own data, uncopied)."""
    arrays = {t.name: t.data for t in model.base}
    if model.lora is None:
        return arrays
    arrays.update({t.name: t.data for t in model.params if t.name in ("cls_w", "cls_b")})
    for layer in range(model.arch.num_layers):
        for site in model.lora.sites:
            name = f"layers.{layer}.{site}"
            a, b = model.params[f"{name}.lora_a"].data, model.params[f"{name}.lora_b"].data
            arrays[name] = (arrays[name] + model.lora.scale * (a.astype(np.float64) @ b)
                            ).astype(np.float32)
    return arrays


def merge_check(arch, base_arch):
    """A one-line error if a base of another architecture is given."""
    if base_arch.to_dict() != arch.to_dict():
        raise SqlgptError(f"the base model's architecture ({base_arch.preset}, "
                          f"{base_arch.num_layers} x {base_arch.embed_dim}) is not the one the "
                          f"adapters were trained on ({arch.preset}, {arch.num_layers} x "
                          f"{arch.embed_dim})")


class LoraStruct:
    """The kernel's Lora struct over a model's adapters: A, B and their
    gradients placed by site in LayerTensors, and per batch size the
    buffers a forward keeps for backward (u per adapted matrix) and its
    scratch."""

    def __init__(self, arch, lora, params):
        self.arch, self.lora = arch, lora
        self._keep = []
        self.sets = {}
        for buf, part in (("a", ("data", "lora_a")), ("b", ("data", "lora_b")),
                          ("da", ("grad", "lora_a")), ("db", ("grad", "lora_b"))):
            layers = ffi.new("LayerTensors[]", arch.num_layers)
            for layer in range(arch.num_layers):
                for site in lora.sites:
                    tensor = params[f"layers.{layer}.{site}.{part[1]}"]
                    if hasattr(tensor, part[0]):  # a model only run has no gradients
                        setattr(layers[layer], site, self._ptr(getattr(tensor, part[0])))
            self.sets[buf] = layers
        self.batch_rows = None  # the rows the buffers below are for

    def _ptr(self, array):
        ptr = ffi.cast("float *", ffi.from_buffer("float[]", array))
        self._keep.append((array, ptr))
        return ptr

    def for_rows(self, N, seeds):
        """The struct for a forward of N rows; seeds: the dropout seeds
        (num_layers * LORA_SITES) or None."""
        if self.batch_rows != N:
            arch, r = self.arch, self.lora.rank
            self.u = ffi.new("LayerTensors[]", arch.num_layers)
            self._u = [{site: aligned_zeros((N, r)) for site in self.lora.sites}
                       for _ in range(arch.num_layers)]
            for layer, arrays in enumerate(self._u):
                for site, array in arrays.items():
                    setattr(self.u[layer], site, ffi.cast("float *", ffi.from_buffer(
                        "float[]", array)))
            self.xdrop = aligned_zeros((N, max(arch.embed_dim, arch.hidden_dim, arch.q_dim)))
            self.tmp = aligned_zeros((N, r))
            self.struct = ffi.new("Lora *")
            s = self.struct
            s.rank, s.scale, s.dropout = r, self.lora.scale, self.lora.dropout
            s.a, s.b, s.da, s.db = (self.sets[k] for k in ("a", "b", "da", "db"))
            s.u = self.u
            s.xdrop = ffi.cast("float *", ffi.from_buffer("float[]", self.xdrop))
            s.tmp = ffi.cast("float *", ffi.from_buffer("float[]", self.tmp))
            self.batch_rows = N
        self._seeds = ffi.new("unsigned long long[]", seeds) if seeds else ffi.NULL
        self.struct.seeds = self._seeds
        return self.struct


def lora_seeds(base_seed, num_layers, arch=None, first_position=0):
    """A dropout seed for each (layer, site), apart from the blocks' own.
    first_position (with arch): the batch's positions before these rows
    (an MPI rank's share), so their masks are those rows' in the whole
    batch (see dropout.shifted_seed)."""
    start = 2 * num_layers  # model.dropout_seeds takes the first 2 per layer
    return [shifted_seed((base_seed + GOLDEN * (start + i + 1)) % 2**64,
                         first_position * _site_shape(arch, SITES[i % len(SITES)])[0]
                         if first_position else 0)
            for i in range(num_layers * len(SITES))]
