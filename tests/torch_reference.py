"""Any sqlgpt architecture written directly in PyTorch: the reference that
sqlgpt's kernel and every other implementation are compared against.

It is written from the rules, not from sqlgpt's code: plain tensor ops, no
nn modules, no fused kernels, so it runs in float64 and every step can be
read. tests/test_reference_models.py checks it against transformers' GPT-2
and llama given the same weights.

B = batch, T = time, C = channels, V = vocab, NH = query heads,
KVH = key/value heads, hs = head size, F = MLP hidden size.
Weights are sqlgpt's: {name: tensor}, matrices (in, out), y = x @ W + b.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from sqlgpt.model.arch import stored_tensors, tensor_table

IGNORE = -1  # the target the loss skips, as sqlgpt's
RELU_TIE = 1e-5  # |pre-activation| under this: float32 and float64 may disagree on its sign
SINUSOID_BASE = 10000.0  # "Attention is all you need"'s fixed positions


def reference_logits(weights, arch, ids, masks=None, relu_signs=None, lora=None):
    """Logits (B, T, V) of arch for ids (B, T).

    masks: None, or 2 * num_layers tensors (B, T, C), already scaled by
    1/(1-p), multiplied into each sublayer's output (attention's, then the
    MLP's, per layer): dropout with the caller's masks.
    relu_signs: None, or per layer the ReLU outputs of the implementation
    under test (any shape holding B*T*F values); only read for mlp="relu",
    see _relu.
    lora: None, or LoRA adapters as PEFT computes them, y = x @ W + b +
    scale * (drop(x) @ A) @ B: {"scale": s, "adapters": {(layer, comp): (A,
    B)}, "masks": {(layer, comp): mask (scaled) or None}}."""
    return reference_hidden(weights, arch, ids, masks, relu_signs, lora) @ \
        _lookup(weights, arch)("head")


def reference_hidden(weights, arch, ids, masks=None, relu_signs=None, lora=None):
    """The head's input (B, T, C): the final hidden states (reference_logits'
    arguments)."""
    lookup = _lookup(weights, arch)
    x = _embed(lookup, arch, ids)
    for layer in range(arch.num_layers):
        w = _Layer(lookup, layer, lora)
        y = _attention(_norm(x, w("ln1_w"), w("ln1_b"), arch), w, arch)
        x = x + _dropped(y, masks, 2 * layer)
        signs = relu_signs[layer] if relu_signs is not None else None
        y = _mlp(_norm(x, w("ln2_w"), w("ln2_b"), arch), w, arch, signs)
        x = x + _dropped(y, masks, 2 * layer + 1)
    if arch.final_norm:
        x = _norm(x, lookup("lnf_w"), lookup("lnf_b"), arch)
    return x


def reference_classify_loss(weights, arch, ids, lens, labels, relu_signs=None, lora=None):
    """A classifier's mean cross-entropy: each sequence's final hidden state
    at its last position (pool last) or averaged over its lens[b] positions
    (pool mean), through cls_w and cls_b. (loss, logits)"""
    h = reference_hidden(weights, arch, ids, relu_signs=relu_signs, lora=lora)
    rows = []
    for b, n in enumerate(lens.tolist()):
        rows.append(h[b, n - 1] if arch.pool == "last" else h[b, :n].mean(dim=0))
    logits = torch.stack(rows) @ weights["cls_w"] + weights["cls_b"]
    return F.cross_entropy(logits, labels, ignore_index=IGNORE), logits


def reference_loss(weights, arch, ids, targets, masks=None, relu_signs=None, lora=None):
    """Mean cross-entropy over the targets that are not IGNORE (-1)."""
    logits = reference_logits(weights, arch, ids, masks, relu_signs, lora)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE)


def random_weights(arch, rng, dtype=torch.float64):
    """Every stored tensor of arch's table, random (numpy Generator rng):
    matrices and embeddings N(0, 0.1), norm gains 1 + N(0, 0.1), biases
    N(0, 0.02). Nothing is left at its init's exact ones or zeros, so a
    tensor read in the wrong place shows."""
    weights = {}
    for spec in stored_tensors(arch):
        kind = spec.init[0]
        if kind == "ones":
            values = 1 + 0.1 * rng.standard_normal(spec.shape)
        elif kind == "zeros":
            values = 0.02 * rng.standard_normal(spec.shape)
        else:
            values = 0.1 * rng.standard_normal(spec.shape)
        weights[spec.name] = torch.tensor(values, dtype=dtype)
    return weights


def _lookup(weights, arch):
    """name -> tensor, or None for a tensor arch's table does not have. A
    tensor the table has must be in weights (a KeyError, never a silent
    skip); a tied one is its source transposed."""
    table = {spec.name: spec for spec in tensor_table(arch)}

    def lookup(name):
        spec = table.get(name)
        if spec is None:
            return None
        return weights[spec.tied_to].T if spec.tied_to else weights[name]
    return lookup


class _Layer:
    """One layer's tensors: w(comp) is that component's tensor (or None);
    w.linear(x, comp) applies the matrix comp with its bias and adapter."""

    def __init__(self, lookup, layer, lora):
        self.lookup, self.layer, self.lora = lookup, layer, lora

    def __call__(self, comp):
        return self.lookup(f"layers.{self.layer}.{comp}")

    def linear(self, x, comp):
        bias = self(f"{comp}_b")
        y = x @ self(comp) + bias if bias is not None else x @ self(comp)
        adapter = self.lora["adapters"].get((self.layer, comp)) if self.lora else None
        if adapter is None:
            return y
        mask = self.lora["masks"].get((self.layer, comp))
        return y + self.lora["scale"] * (((x * mask if mask is not None else x) @ adapter[0])
                                         @ adapter[1])


def _embed(lookup, arch, ids):
    """The residual stream's start (B, T, C): token rows plus positions
    (rope instead rotates q and k; none adds nothing)."""
    x = lookup("wte")[ids]
    T = ids.shape[1]
    if arch.pos == "learned":
        x = x + lookup("wpe")[:T]
    elif arch.pos == "sinusoidal":
        x = x + _sinusoids(T, arch.embed_dim).to(x.dtype)
    return x


def _sinusoids(T, C):
    """(T, C): sin at even channels, cos at odd, channel pair i at
    frequency 10000^(-2i/C). Computed in float64."""
    t = torch.arange(T, dtype=torch.float64)[:, None]
    freq = SINUSOID_BASE ** (-torch.arange(0, C, 2, dtype=torch.float64) / C)
    pe = torch.empty(T, C, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(t * freq)
    pe[:, 1::2] = torch.cos(t * freq)
    return pe


def _norm(x, weight, bias, arch):
    """layernorm or rmsnorm over channels; weight/bias None when absent."""
    if arch.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=arch.norm_eps)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch.norm_eps)
    return x * weight if weight is not None else x


def _dropped(y, masks, site):
    return y * masks[site] if masks is not None else y


def _attention(x, w, arch):
    """Causal grouped-query attention of x (B, T, C) -> (B, T, C), through
    heads of head_dim (whose NH x head_dim need not be C)."""
    B, T, C = x.shape
    NH, KVH, hs = arch.num_heads, arch.n_kv_heads, arch.head_dim
    q = w.linear(x, "q").view(B, T, NH, hs).transpose(1, 2)  # (B, NH, T, hs)
    k = w.linear(x, "k").view(B, T, KVH, hs).transpose(1, 2)  # (B, KVH, T, hs)
    v = w.linear(x, "v").view(B, T, KVH, hs).transpose(1, 2)
    if arch.pos == "rope":
        q, k = _rotate(q, arch.rope_theta), _rotate(k, arch.rope_theta)
    # query head h reads kv head h // (NH / KVH): consecutive query heads share one
    k, v = (t.repeat_interleave(NH // KVH, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, NH, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    y = (probs @ v).transpose(1, 2).reshape(B, T, NH * hs)
    return w.linear(y, "proj")


def _rotate(x, theta):
    """Rotary positions on x (B, H, T, hs), llama's half-split layout: channel
    i pairs with i + hs/2 and turns by angle t * theta^(-2i/hs)."""
    T, hs = x.shape[-2], x.shape[-1]
    t = torch.arange(T, dtype=torch.float64)[:, None]
    angle = t * theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (T, hs/2)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    first, second = x[..., :hs // 2], x[..., hs // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _mlp(x, w, arch, relu_signs):
    """The feed-forward sublayer of x (B, T, C) -> (B, T, C)."""
    h = w.linear(x, "fc1")  # (B, T, F)
    if arch.mlp == "relu":
        h = _relu(h, relu_signs)
    elif arch.mlp == "gelu":
        h = F.gelu(h, approximate="tanh")
    else:  # swiglu: fc1 is llama's up projection, gated by silu(gate)
        h = F.silu(w.linear(x, "gate")) * h
    return w.linear(h, "fc2")


def _relu(h, relu_signs):
    """ReLU. relu_signs: the tested implementation's ReLU outputs (positive
    exactly where its pre-activation was). Where a pre-activation is within
    RELU_TIE of the kink, float32 and float64 may land on opposite sides and
    the two gradients then differ by a whole term; there, and only there,
    the reference takes the side the tested forward took."""
    positive = h > 0
    if relu_signs is not None:
        theirs = torch.as_tensor(np.asarray(relu_signs).reshape(h.shape) > 0)
        positive = torch.where(h.detach().abs() < RELU_TIE, theirs, positive)
    return h * positive
