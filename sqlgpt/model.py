"""The GPT model: configuration, parameter layout, and forward/backward as a
straight line of kernel calls per layer (backward is its mirror).

Preset `lua` is the original script's model with its bugs fixed: pre-norm blocks
with parameter-free layernorm, causal attention with full q/k/v/proj matrices,
ReLU MLP 4x, no biases, learned positions, untied head, no final norm.
Weights are (in, out): y = x @ W.
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ._kernel import ffi, lib
from .errors import SqlgptError
from .tensor import ParameterSet, aligned_zeros, fptr, iptr

LAYER_COMPONENTS = ("q", "k", "v", "proj", "fc1", "fc2")
PAD_ID = 0  # <pad>: never a target (the loss's ignore index)
LN_EPS = 1e-5


@dataclass
class Config:
    """Training and model settings; names match the original's `cfg` keys."""
    vocab_size: int = 426     # words kept; ids 1..vocab_size, plus <pad>=0 and <unk>
    embed_dim: int = 128
    num_heads: int = 8        # must divide embed_dim
    num_layers: int = 6
    seq_len: int = 256        # context length (also the size of wpe)
    batch_size: int = 32
    lr: float = 3e-4
    max_iters: int = 1000     # the original shipped 1 ("increase for actual training")
    dropout: float = 0.2      # train mode only
    beta1: float = 0.9        # plain Adam, as the original
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # > 0 turns Adam into AdamW
    grad_clip: float = 0.0    # clip the global gradient norm to this (0: off, as the original)
    lr_schedule: str = "constant"  # or "cosine": decay to lr/10 at max_iters
    warmup_iters: int = 0     # linear warm-up steps before the schedule
    seed: int = 1337
    preset: str = "lua"
    tokenizer: str = "word"

    @property
    def n_classes(self):
        """Output classes: the words plus <pad> and <unk>."""
        return self.vocab_size + 2

    @property
    def head_dim(self):
        return self.embed_dim // self.num_heads

    def validate(self):
        """Raise SqlgptError for a configuration that cannot be built or trained."""
        limits = {"vocab_size": 10**7, "embed_dim": 16384, "num_heads": 16384,
                  "num_layers": 1024, "seq_len": 65536, "batch_size": 2**20,
                  "max_iters": 2**31 - 1}
        for name, limit in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= limit:
                raise SqlgptError(f"{name} must be an integer from 1 to {limit:,}, got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise SqlgptError(f"seed must be an integer from 0 to 2**63-1, got {self.seed!r}")
        if self.embed_dim % self.num_heads:
            raise SqlgptError(f"num_heads ({self.num_heads}) must divide embed_dim "
                              f"({self.embed_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise SqlgptError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1e3):
            raise SqlgptError(f"lr must be a positive number up to 1000, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise SqlgptError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise SqlgptError("beta1 and beta2 must be in [0, 1) and eps positive")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SqlgptError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SqlgptError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not isinstance(self.warmup_iters, int) or not 0 <= self.warmup_iters < 2**31:
            raise SqlgptError(f"warmup_iters must be >= 0, got {self.warmup_iters!r}")
        if self.preset not in PRESETS:
            raise SqlgptError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if self.tokenizer != "word":
            raise SqlgptError(f"unknown tokenizer {self.tokenizer!r} (known: word)")
        return self

    def lr_at(self, step):
        """Learning rate for a 1-based step: warm-up, then constant or cosine."""
        if step <= self.warmup_iters:
            return self.lr * step / (self.warmup_iters + 1)
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.max_iters - self.warmup_iters)
        progress = min(1.0, (step - self.warmup_iters) / span)
        min_lr = self.lr / 10
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from stored key/values, converting each to its field's type."""
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key in known:
                kwargs[key] = _typed(key, value, known[key])
        return cls(**kwargs)


def _typed(key, value, kind):
    """A stored config value as its field's type, refusing lossy conversions."""
    ok = {int: isinstance(value, int) or (isinstance(value, float) and value.is_integer()),
          float: isinstance(value, (int, float)),
          str: isinstance(value, str)}[kind]
    if not ok or isinstance(value, bool):
        raise SqlgptError(f"config {key} has a bad value {value!r}")
    return kind(value)


PRESETS = {"lua": {}}  # preset name -> overrides of the Config defaults


def parameter_specs(cfg):
    """(name, shape) of every parameter, in storage order."""
    C, V = cfg.embed_dim, cfg.n_classes
    shapes = {"q": (C, C), "k": (C, C), "v": (C, C), "proj": (C, C),
              "fc1": (C, 4 * C), "fc2": (4 * C, C)}
    specs = [("wte", (V, C)), ("wpe", (cfg.seq_len, C))]
    for layer in range(cfg.num_layers):
        specs += [(f"layers.{layer}.{comp}", shapes[comp]) for comp in LAYER_COMPONENTS]
    specs.append(("head", (C, V)))
    return specs


class Activations:
    """Every buffer one forward/backward pass needs for a (B, T) batch,
    allocated once and reused while the batch shape stays the same."""

    def __init__(self, cfg, B, T):
        C, N, V = cfg.embed_dim, B * T, cfg.n_classes
        self.B, self.T = B, T

        def buf(*shape):
            return aligned_zeros(shape)

        # per layer: the residual input and what backward needs of each op
        self.layers = [dict(x=buf(N, C), ln1=buf(N, C), mean1=buf(N), rstd1=buf(N),
                            q=buf(N, C), k=buf(N, C), v=buf(N, C), att=buf(N, C),
                            lse=buf(B, cfg.num_heads, T), xmid=buf(N, C), ln2=buf(N, C),
                            mean2=buf(N), rstd2=buf(N), a=buf(N, 4 * C))
                       for _ in range(cfg.num_layers)]
        self.x_final = buf(N, C)
        self.branch = buf(N, C)      # a sublayer's output before dropout
        self.logits = buf(N, V)
        self.losses = buf(N)
        # backward scratch
        self.dx, self.dbranch, self.datt = buf(N, C), buf(N, C), buf(N, C)
        self.dq, self.dk, self.dv, self.dln = buf(N, C), buf(N, C), buf(N, C), buf(N, C)
        self.da = buf(N, 4 * C)  # also the gradient of fc1's output, in place


def dropout_seeds(base_seed, num_layers):
    """Two dropout sites per layer, each with its own 64-bit seed."""
    return [(base_seed + 0x9E3779B97F4A7C15 * (i + 1)) % 2**64 for i in range(2 * num_layers)]


class GPT:
    """Parameters plus the kernel calls of one forward and one backward pass."""

    def __init__(self, cfg):
        self.cfg = cfg.validate()
        self.params = ParameterSet(parameter_specs(cfg))
        self.acts = None
        self._ids = self._targets = None
        self._seeds = None

    # ---- initialization (the original's scheme) ----
    def init_weights(self, rng):
        C = self.cfg.embed_dim
        p = self.params

        def uniform(t, half_width):
            t.data[...] = rng.uniform(-half_width, half_width, t.shape).astype(np.float32)

        uniform(p["wte"], 0.5 / math.sqrt(C))          # (rand - 0.5) / sqrt(C)
        uniform(p["wpe"], 0.005)                        # (rand - 0.5) * 0.01
        for layer in range(self.cfg.num_layers):
            for comp in ("q", "k", "v", "proj"):
                uniform(p[f"layers.{layer}.{comp}"], 0.5 * math.sqrt(1.0 / C))
            uniform(p[f"layers.{layer}.fc1"], math.sqrt(3.0 / C))      # +-sqrt(3/fan_in)
            uniform(p[f"layers.{layer}.fc2"], math.sqrt(3.0 / (4 * C)))
        uniform(p["head"], 0.5 / math.sqrt(C))

    def _activations(self, B, T):
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = None  # free the old set before allocating the new one
            self.acts = Activations(self.cfg, B, T)
        return self.acts

    def check_ids(self, ids):
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise SqlgptError(f"token ids must be a non-empty (batch, time) array, got {ids.shape}")
        if ids.shape[1] > self.cfg.seq_len:
            raise SqlgptError(f"sequence of {ids.shape[1]} tokens exceeds seq_len {self.cfg.seq_len}")
        if ids.min() < 0 or ids.max() >= self.cfg.n_classes:
            raise SqlgptError(f"token id out of range [0, {self.cfg.n_classes})")
        return ids

    # ---- forward ----
    def forward(self, ids, targets=None, dropout_seed=None):
        """ids (B,T) -> logits (B*T, V) in self.acts.logits; returns the mean loss
        if targets (B,T) are given. dropout_seed=None is evaluation mode."""
        cfg, p = self.cfg, self.params
        ids = self.check_ids(ids)
        B, T = ids.shape
        N, C, NH, V = B * T, cfg.embed_dim, cfg.num_heads, cfg.n_classes
        a = self._activations(B, T)
        use_dropout = dropout_seed is not None and cfg.dropout > 0
        seeds = dropout_seeds(dropout_seed or 0, cfg.num_layers)
        self._ids, self._seeds = ids, (seeds if use_dropout else None)

        x = a.layers[0]["x"]
        lib.embedding_forward(fptr(x), iptr(ids), fptr(p["wte"].data), fptr(p["wpe"].data), B, T, C)
        for layer, L in enumerate(a.layers):
            W = {c: fptr(p[f"layers.{layer}.{c}"].data) for c in LAYER_COMPONENTS}
            out = a.layers[layer + 1]["x"] if layer + 1 < cfg.num_layers else a.x_final
            # attention sublayer: xmid = x + dropout(attn(ln1(x)) @ proj)
            lib.layernorm_forward(fptr(L["ln1"]), fptr(L["mean1"]), fptr(L["rstd1"]), fptr(L["x"]),
                                  ffi.NULL, ffi.NULL, N, C, LN_EPS)
            for name in ("q", "k", "v"):
                lib.matmul_forward(fptr(L[name]), fptr(L["ln1"]), W[name], ffi.NULL, N, C, C)
            lib.attention_forward(fptr(L["att"]), fptr(L["lse"]), fptr(L["q"]), fptr(L["k"]),
                                  fptr(L["v"]), B, T, C, NH)
            lib.matmul_forward(fptr(a.branch), fptr(L["att"]), W["proj"], ffi.NULL, N, C, C)
            self._residual_add(L["xmid"], L["x"], a.branch, seeds[2 * layer] if use_dropout else None)
            # MLP sublayer: out = xmid + dropout(relu(ln2(xmid) @ fc1) @ fc2)
            lib.layernorm_forward(fptr(L["ln2"]), fptr(L["mean2"]), fptr(L["rstd2"]), fptr(L["xmid"]),
                                  ffi.NULL, ffi.NULL, N, C, LN_EPS)
            lib.matmul_relu_forward(fptr(L["a"]), fptr(L["ln2"]), W["fc1"], N, C, 4 * C)
            lib.matmul_forward(fptr(a.branch), fptr(L["a"]), W["fc2"], ffi.NULL, N, 4 * C, C)
            self._residual_add(out, L["xmid"], a.branch, seeds[2 * layer + 1] if use_dropout else None)
        lib.matmul_forward(fptr(a.logits), fptr(a.x_final), fptr(p["head"].data), ffi.NULL, N, C, V)
        if targets is None:
            self._targets = None
            return None
        self._targets = self.check_ids(targets).reshape(-1)
        return lib.crossentropy_forward(fptr(a.losses), fptr(a.logits), iptr(self._targets),
                                        N, V, PAD_ID)

    def _residual_add(self, out, x, branch, seed):
        """out = x + dropout(branch), or x + branch with seed None (eval)."""
        p = self.cfg.dropout if seed is not None else 0.0
        lib.residual_dropout_forward(fptr(out), fptr(x), fptr(branch), branch.size, p, seed or 0)

    # ---- backward: the mirror of forward, accumulating into .grad ----
    def backward(self):
        """Gradients of the last forward's mean loss into every parameter's .grad
        (accumulated; call params.zero_grad() first). Overwrites the logits."""
        if self._targets is None:
            raise SqlgptError("backward() needs a forward() with targets first")
        cfg, p, a = self.cfg, self.params, self.acts
        B, T = a.B, a.T
        N, C, NH, V = B * T, cfg.embed_dim, cfg.num_heads, cfg.n_classes
        # dlogits overwrite logits in place: each row is read before it is written
        dlogits = a.logits
        lib.crossentropy_backward(fptr(dlogits), fptr(a.logits), iptr(self._targets), N, V, PAD_ID, 1.0)
        lib.matmul_backward(fptr(a.dx), fptr(p["head"].grad), ffi.NULL, fptr(dlogits),
                            fptr(a.x_final), fptr(p["head"].data), N, C, V, 0)
        for layer in reversed(range(cfg.num_layers)):
            L = a.layers[layer]
            W = {c: p[f"layers.{layer}.{c}"] for c in LAYER_COMPONENTS}
            # MLP sublayer (a.dx is the gradient of this layer's output)
            self._branch_grad(a.dx, layer, 1)
            lib.matmul_backward(fptr(a.da), fptr(W["fc2"].grad), ffi.NULL, fptr(a.dbranch),
                                fptr(L["a"]), fptr(W["fc2"].data), N, 4 * C, C, 0)
            # a > 0 exactly where fc1's output h > 0: relu's mask without keeping h
            lib.relu_backward(fptr(a.da), fptr(a.da), fptr(L["a"]), N * 4 * C)
            lib.matmul_backward(fptr(a.dln), fptr(W["fc1"].grad), ffi.NULL, fptr(a.da),
                                fptr(L["ln2"]), fptr(W["fc1"].data), N, C, 4 * C, 0)
            lib.layernorm_backward(fptr(a.dx), ffi.NULL, ffi.NULL, fptr(a.dln), fptr(L["xmid"]),
                                   ffi.NULL, fptr(L["mean2"]), fptr(L["rstd2"]), N, C)
            # attention sublayer (a.dx is now the gradient of xmid)
            self._branch_grad(a.dx, layer, 0)
            lib.matmul_backward(fptr(a.datt), fptr(W["proj"].grad), ffi.NULL, fptr(a.dbranch),
                                fptr(L["att"]), fptr(W["proj"].data), N, C, C, 0)
            lib.attention_backward(fptr(a.dq), fptr(a.dk), fptr(a.dv), fptr(a.datt),
                                   fptr(L["q"]), fptr(L["k"]), fptr(L["v"]), fptr(L["att"]),
                                   fptr(L["lse"]), B, T, C, NH)
            for name, dbuf in (("q", a.dq), ("k", a.dk), ("v", a.dv)):  # dln = sum of three
                lib.matmul_backward(fptr(a.dln), fptr(W[name].grad), ffi.NULL, fptr(dbuf),
                                    fptr(L["ln1"]), fptr(W[name].data), N, C, C, name != "q")
            lib.layernorm_backward(fptr(a.dx), ffi.NULL, ffi.NULL, fptr(a.dln), fptr(L["x"]),
                                   ffi.NULL, fptr(L["mean1"]), fptr(L["rstd1"]), N, C)
        lib.embedding_backward(fptr(p["wte"].grad), fptr(p["wpe"].grad), fptr(a.dx),
                               iptr(self._ids), B, T, C)

    def _branch_grad(self, dout, layer, site):
        """a.dbranch = gradient of a sublayer's output, through its dropout."""
        a = self.acts
        if self._seeds is None:
            np.copyto(a.dbranch, dout)
            return
        lib.dropout_backward(fptr(a.dbranch), fptr(dout), dout.size, self.cfg.dropout,
                             self._seeds[2 * layer + site])

    # ---- optimizer ----
    def grad_norm_squared(self):
        g = self.params.arenas["grad"]
        return lib.sum_squares(fptr(g), g.size)

    def adam_step(self, step, lr):
        """One Adam/AdamW update of every parameter (step is 1-based)."""
        ar, cfg = self.params.arenas, self.cfg
        lib.adamw_update(fptr(ar["data"]), fptr(ar["grad"]), fptr(ar["m"]), fptr(ar["v"]),
                         ar["data"].size, lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, step)
