"""The GPT model: parameters laid out by the tensor table (arch.py), and the
kernel's whole-model forward and backward (csrc/model.c), one call each.

Python's part is bookkeeping: it owns the buffers (parameters in four flat
arenas, activations per batch shape) and hands the kernel structs of
pointers to them, filled by reading the tensor table, never by names.
"""
import numpy as np

from .. import contract
from .._kernel import ffi, lib
from .arch import head_specs, language_model, stored_tensors, tensor_table
from .config import OPTIMIZERS
from ..errors import SqlgptError
from .dropout import dropout_seeds
from .lora import LoraStruct, lora_seeds, lora_tensors
from .tensor import BUFFERS, ParameterSet, aligned_zeros, fptr, iptr

IGNORE = -1  # a target the loss skips: never a token id, so every id can be a target

NORM = {"layernorm": lib.NORM_LAYERNORM, "rmsnorm": lib.NORM_RMSNORM}
POS = {"learned": lib.POS_LEARNED, "sinusoidal": lib.POS_SINUSOIDAL, "rope": lib.POS_ROPE,
       "none": lib.POS_NONE}
MLP = {"relu": lib.MLP_RELU, "gelu": lib.MLP_GELU, "swiglu": lib.MLP_SWIGLU}
ROPE_SCALING = {"none": lib.ROPE_SCALING_NONE, "linear": lib.ROPE_SCALING_LINEAR,
                "llama3": lib.ROPE_SCALING_LLAMA3}


def check_status(status):
    """Turn a kernel status into the one-line error users see."""
    if status == lib.SQLGPT_NOMEM:
        raise MemoryError("the kernel could not allocate its scratch memory")
    if status != lib.SQLGPT_OK:
        raise SqlgptError(f"the kernel failed (status {status})")


def model_config(arch):
    """The kernel's ModelConfig for an architecture."""
    cfg = ffi.new("ModelConfig *")
    cfg.num_layers, cfg.C, cfg.NH = arch.num_layers, arch.embed_dim, arch.num_heads
    cfg.HS = arch.head_dim
    cfg.KVH, cfg.F, cfg.V, cfg.max_T = arch.n_kv_heads, arch.hidden_dim, arch.n_vocab, arch.seq_len
    cfg.norm, cfg.pos, cfg.mlp = NORM[arch.norm], POS[arch.pos], MLP[arch.mlp]
    cfg.final_norm, cfg.norm_eps, cfg.rope_theta = arch.final_norm, arch.norm_eps, arch.rope_theta
    cfg.rope_scaling = ROPE_SCALING[arch.rope_scaling]
    cfg.rope_factor, cfg.rope_low_freq = arch.rope_factor, arch.rope_low_freq
    cfg.rope_high_freq, cfg.rope_original_T = arch.rope_high_freq, arch.rope_original_context
    cfg.L, cfg.pool = arch.num_labels, contract.POOLS.index(arch.pool)
    return cfg


def rope_frequencies(arch):
    """Each rope pair's frequency (radians per position, head_dim / 2 of
    them) as the kernel turns it: the scaled ones where arch scales rope."""
    hs = arch.head_dim
    cos, sin = np.zeros((2, hs // 2), np.float32), np.zeros((2, hs // 2), np.float32)
    lib.rope_table(fptr(cos), fptr(sin), 2, hs, model_config(arch))
    return np.arctan2(sin[1].astype(np.float64), cos[1])  # position 1: below pi


def sinusoids(T, C):
    """The fixed position table of 'Attention Is All You Need': (T, C),
    PE[t, 2i] = sin(t / 10000^(2i/C)), PE[t, 2i+1] = cos(t / 10000^(2i/C))."""
    table = aligned_zeros((T, C))
    angles = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, C, 2) / C)
    table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
    return table


class TensorStruct:
    """A ModelTensors struct whose fields point at arrays: {field: array}
    for the model-wide ones, one such dict per layer. Fields left out are
    NULL. Keeps every pointer alive as long as the struct."""

    def __init__(self, num_layers, globals_, layers):
        self.struct = ffi.new("ModelTensors *")
        self.layers = ffi.new("LayerTensors[]", max(1, num_layers))
        self.struct.layers = self.layers
        self._keep = []
        for field, ptr in globals_.items():
            setattr(self.struct, field, self._ptr(ptr))
        for layer, fields_ in enumerate(layers):
            for field, ptr in fields_.items():
                setattr(self.layers[layer], field, self._ptr(ptr))

    def _ptr(self, value):
        ptr = fptr(value) if isinstance(value, np.ndarray) else value
        self._keep.append(ptr)
        return ffi.cast("float *", ptr)


def tensor_fields(arch, arrays, fixed=None):
    """(globals, layers) field dicts for TensorStruct from {name: array}
    (names without an entry stay NULL), read off the tensor table; fixed:
    model-wide fields that are not parameters (the sinusoidal wpe)."""
    globals_, layers = dict(fixed or {}), [{} for _ in range(arch.num_layers)]
    for spec in tensor_table(arch):
        if spec.name in arrays:
            target = globals_ if spec.layer is None else layers[spec.layer]
            target[spec.component] = arrays[spec.name]
    return globals_, layers


def activation_shapes(arch, B, T, classify=False):
    """(per-layer {name: shape}, model-wide {name: shape}) of the buffers of
    a (B, T) forward and backward (the fields of LayerActs and ModelActs);
    classify: a classifier's, whose logits and losses are per sequence."""
    N, C, F, Q, KV = B * T, arch.embed_dim, arch.hidden_dim, arch.q_dim, arch.kv_dim
    layer_shapes = dict(x=(N, C), ln1=(N, C), mean1=(N,), rstd1=(N,), q=(N, Q), k=(N, KV),
                        v=(N, KV), att=(N, Q), lse=(B, arch.num_heads, T), xmid=(N, C),
                        ln2=(N, C), mean2=(N,), rstd2=(N,), h=(N, F))
    shapes = dict(x_final=(N, C), logits=(N, arch.n_vocab), losses=(N,), branch=(N, C),
                  dx=(N, C), dbranch=(N, C), datt=(N, Q), dq=(N, Q), dk=(N, KV), dv=(N, KV),
                  dln=(N, C), dh=(N, F))  # dh: also the gradient of fc1's output
    if arch.mlp != "relu":  # relu keeps only its output: h > 0 is its mask
        layer_shapes["pre"] = (N, F)
    if arch.mlp == "swiglu":
        layer_shapes["gate"] = shapes["dgate"] = (N, F)
    if classify:
        shapes.update(logits=(B, arch.num_labels), losses=(B,), pooled=(B, C))
    if arch.final_norm:
        shapes.update(lnf=(N, C), meanf=(N,), rstdf=(N,))
    if arch.pos == "rope":
        shapes["rope_cos"] = shapes["rope_sin"] = (T, arch.head_dim // 2)
    return layer_shapes, shapes


class Activations:
    """Every buffer one forward/backward pass needs for a (B, T) batch, and
    the ModelActs struct over them; allocated once and reused while the
    batch shape stays the same. recompute (activation checkpointing): the
    layers keep only their inputs and share one block's other buffers,
    which backward fills again block by block."""

    def __init__(self, arch, B, T, recompute=False, classify=False):
        self.B, self.T, self.recompute, self.classify = B, T, recompute, classify
        layer_shapes, shapes = activation_shapes(arch, B, T, classify)
        shared = {name: aligned_zeros(shape) for name, shape in layer_shapes.items()
                  if name != "x"} if recompute else None
        self.layers = [{name: shared[name] if shared and name != "x" else aligned_zeros(shape)
                        for name, shape in layer_shapes.items()}
                       for _ in range(arch.num_layers)]
        self.buffers = {name: aligned_zeros(shape) for name, shape in shapes.items()}
        self.logits = self.buffers["logits"]
        self.struct = ffi.new("ModelActs *")
        self.struct.recompute = int(recompute)
        self._layer_structs = ffi.new("LayerActs[]", max(1, arch.num_layers))
        self.struct.layers = self._layer_structs
        self._keep = []
        for name, array in self.buffers.items():
            setattr(self.struct, name, self._ptr(array))
        for layer, buffers in enumerate(self.layers):
            for name, array in buffers.items():
                setattr(self._layer_structs[layer], name, self._ptr(array))

    def _ptr(self, array):
        ptr = fptr(array)
        self._keep.append(ptr)
        return ptr


class GPT:
    """Parameters plus one kernel call for the forward and one for the
    backward. With lora (a LoraConfig), the tensor table's weights are a
    frozen base (data only, no gradients) and params, what trains and what
    checkpoints store, are the adapters."""

    def __init__(self, arch, checkpoint_activations=False, lora=None, moments=True,
                 training=True):
        self.arch = arch.validate()
        self.lora = lora.validate(arch) if lora else None
        # recompute each block's activations in backward instead of keeping them
        self.checkpoint_activations = checkpoint_activations
        # moments=False: no m and v arenas (an MPI rank keeping a shard of them);
        # training=False: the weights alone, a third of a trainable model's memory
        buffers = ("data",) if not training else BUFFERS if moments else ("data", "grad")
        self.training = training
        if lora:  # a classifier's head trains with the adapters
            self.base = ParameterSet(stored_tensors(language_model(arch)), buffers=("data",))
            self.params = ParameterSet(lora_tensors(arch, lora) + head_specs(arch), buffers)
        else:
            self.base = self.params = ParameterSet(stored_tensors(arch), buffers)
        head = {t.name: t for t in self.params if t.name in ("cls_w", "cls_b")} if lora else {}
        self.kernel_config = model_config(arch)
        # fixed (not learned) tensors the kernel reads as parameters
        self.weights_fixed = ({"wpe": sinusoids(arch.seq_len, arch.embed_dim)}
                              if arch.pos == "sinusoidal" else {})
        self.weights = TensorStruct(arch.num_layers, *tensor_fields(
            arch, {**{t.name: t.data for t in self.base}, **{n: t.data for n, t in head.items()}},
            self.weights_fixed))
        trained = (head.values() if lora else self.params) if training else ()
        self.grads = TensorStruct(arch.num_layers, *tensor_fields(
            arch, {t.name: t.grad for t in trained}))
        self.adapters = LoraStruct(arch, lora, self.params) if lora else None
        self.acts = None
        self._last = None  # what backward needs of the last forward with targets

    # ---- initialization: the tensor table's init column, in table order ----
    def init_weights(self, rng):
        for t in self.params:
            kind, scale = t.spec.init
            if kind == "uniform":
                t.data[...] = rng.uniform(-scale, scale, t.shape).astype(np.float32)
            elif kind == "normal":
                t.data[...] = rng.normal(0.0, scale, t.shape).astype(np.float32)
            else:
                t.data[...] = 1.0 if kind == "ones" else 0.0

    def _activations(self, B, T, classify=False):
        shape = (B, T, self.checkpoint_activations, classify)
        if self.acts is None or (self.acts.B, self.acts.T, self.acts.recompute,
                                 self.acts.classify) != shape:
            self.acts = None  # free the old set before allocating the new one
            self.acts = Activations(self.arch, *shape)
        return self.acts

    def check_ids(self, ids, targets=False):
        """ids as int32 (batch, time), each in [0, n_vocab) (targets may
        also be IGNORE)."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise SqlgptError(f"token ids must be a non-empty (batch, time) array, got {ids.shape}")
        if ids.shape[1] > self.arch.seq_len:
            raise SqlgptError(f"sequence of {ids.shape[1]} tokens exceeds seq_len "
                              f"{self.arch.seq_len}")
        low = IGNORE if targets else 0
        if ids.min() < low or ids.max() >= self.arch.n_vocab:
            raise SqlgptError(f"token id out of range [0, {self.arch.n_vocab})")
        return ids

    # ---- forward and backward, one kernel call each ----
    def forward(self, ids, targets=None, dropout=0.0, dropout_seed=None, first_row=0):
        """ids (B,T) -> logits (B*T, V) in self.acts.logits; returns the mean
        loss if targets (B,T) are given. dropout_seed=None is evaluation mode.
        first_row: where these rows begin in a larger batch (an MPI rank's
        share), whose dropout masks they then get."""
        ids = self.check_ids(ids)
        B, T = ids.shape
        a = self._activations(B, T)
        targets = None if targets is None else self.check_ids(targets, targets=True)
        if targets is not None and targets.shape != ids.shape:
            raise SqlgptError(f"targets {targets.shape} do not match ids {ids.shape}")
        use_dropout = dropout_seed is not None and dropout > 0
        first = first_row * T  # the first row's first position in the batch
        seeds = (ffi.new("unsigned long long[]", dropout_seeds(
            dropout_seed, self.arch.num_layers, first * self.arch.embed_dim))
                 if use_dropout else ffi.NULL)
        loss = ffi.new("double *")
        lora = self._lora_struct(B * T, dropout_seed, first)
        check_status(lib.model_forward(
            self.kernel_config, self.weights.struct, lora, a.struct, iptr(ids),
            iptr(targets) if targets is not None else ffi.NULL, B, T, dropout, seeds, IGNORE, loss))
        self._last = None if targets is None else (ids, targets, dropout, seeds, lora)
        return None if targets is None else loss[0]

    def backward(self):
        """Gradients of the last forward's mean loss into every parameter's .grad
        (accumulated; call params.zero_grad() first). Overwrites the logits."""
        if self._last is None or isinstance(self._last[0], str):
            raise SqlgptError("backward() needs a forward() with targets first")
        ids, targets, dropout, seeds, lora = self._last
        a = self.acts
        self._last = None  # the logits are gradients now: one backward per forward
        check_status(lib.model_backward(
            self.kernel_config, self.weights.struct, self.grads.struct, lora, a.struct,
            iptr(ids), iptr(targets), a.B, a.T, dropout, seeds, IGNORE))

    # ---- a classifier: one kernel call each way as well ----
    def classify_forward(self, ids, lens, labels=None, dropout=0.0, dropout_seed=None):
        """ids (B,T) padded on the right, lens (B) their lengths -> the
        head's logits (B, num_labels) in self.acts.logits; returns the mean
        loss if labels (B) are given (IGNORE skips one)."""
        L = self.arch.num_labels
        if not L:
            raise SqlgptError("this model has no classification head")
        ids = self.check_ids(ids)
        B, T = ids.shape
        lens = np.ascontiguousarray(lens, dtype=np.int32)
        if lens.shape != (B,) or lens.min() < 1 or lens.max() > T:
            raise SqlgptError(f"each of the {B} sequences needs a length from 1 to {T}")
        if labels is not None:
            labels = np.ascontiguousarray(labels, dtype=np.int32)
            if labels.shape != (B,) or ((labels != IGNORE) & ((labels < 0) | (labels >= L))).any():
                raise SqlgptError(f"labels must be {B} ids in [0, {L})")
        a = self._activations(B, T, classify=True)
        seeds = (ffi.new("unsigned long long[]", dropout_seeds(
            dropout_seed, self.arch.num_layers, 0))
                 if dropout_seed is not None and dropout > 0 else ffi.NULL)
        loss = ffi.new("double *")
        lora = self._lora_struct(B * T, dropout_seed)
        check_status(lib.model_classify_forward(
            self.kernel_config, self.weights.struct, lora, a.struct, iptr(ids), iptr(lens),
            iptr(labels) if labels is not None else ffi.NULL, B, T, dropout, seeds, IGNORE,
            loss))
        self._last = None if labels is None else ("classify", ids, lens, labels, dropout, seeds,
                                                  lora)
        return None if labels is None else loss[0]

    def classify_backward(self):
        """Gradients of the last classify_forward's mean loss (accumulated)."""
        if self._last is None or not isinstance(self._last[0], str):
            raise SqlgptError("classify_backward() needs a classify_forward() with labels first")
        _, ids, lens, labels, dropout, seeds, lora = self._last
        a = self.acts
        self._last = None
        check_status(lib.model_classify_backward(
            self.kernel_config, self.weights.struct, self.grads.struct, lora, a.struct,
            iptr(ids), iptr(lens), iptr(labels), a.B, a.T, dropout, seeds, IGNORE))

    def _lora_struct(self, N, dropout_seed, first=0):
        """The adapters' struct for N rows (NULL without adapters), the first
        `first` rows of the batch before them; their dropout runs in
        training (a dropout_seed) only."""
        if self.adapters is None:
            return ffi.NULL
        train = dropout_seed is not None and self.lora.dropout > 0
        return self.adapters.for_rows(
            N, lora_seeds(dropout_seed, self.arch.num_layers, self.arch, first)
            if train else None)

    # ---- optimizer ----
    def grad_norm_squared(self):
        g = self.params.arenas["grad"]
        return lib.sum_squares(fptr(g), g.size)

    def optimizer_step(self, step, lr, optimizer="adamw", beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, span=None, moments=None):
        """One update of every parameter (step is 1-based): AdamW (decoupled
        decay), Adam (decay as L2 in the gradient) or SGD with momentum (its
        buffer in the m arena). The decay applies to the tensor table's decay
        group only, which the arenas hold first, so each group is one call.
        span (start, stop) of the arenas with moments (m, v) of that span:
        update only that part (an MPI rank's ZeRO shard)."""
        if optimizer not in OPTIMIZERS:
            raise SqlgptError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"not {optimizer!r}")
        ar, split = self.params.arenas, self.params.no_decay_start
        low, high = span or (0, ar["data"].size)
        m_all, v_all = moments or (ar["m"][low:high], ar["v"][low:high])
        for start, stop, decay in ((low, min(split, high), weight_decay),
                                   (max(split, low), high, 0.0)):
            if stop <= start:
                continue
            data, grad = fptr(ar["data"][start:stop]), fptr(ar["grad"][start:stop])
            m, v = fptr(m_all[start - low:stop - low]), fptr(v_all[start - low:stop - low])
            if optimizer == "sgd":
                lib.sgd_update(data, grad, m, stop - start, lr, momentum, decay)
            else:
                lib.adamw_update(data, grad, m, v, stop - start, lr, beta1, beta2, eps, decay,
                                 optimizer == "adamw", step)
