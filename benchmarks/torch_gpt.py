"""sqlgpt's presets written as ordinary PyTorch models: the baselines that
benchmarks/bench.py measures sqlgpt against.

Each is written the way its own community writes it, so the comparison is
with idiomatic PyTorch, not with a port of sqlgpt:
- TorchGPT, the `lua` preset: token + learned position embeddings, pre-norm
  blocks with parameter-free layernorm, bias-free q, k, v and proj, ReLU MLP,
  no final norm, an untied bias-free head.
- NanoGPT, the `gpt2` preset as nanoGPT's model.py: fused c_attn, LayerNorm
  with bias, GELU (tanh form), final ln_f, head tied to wte.
- Llama, the `llama` preset as llama2.c's model.py: RMSNorm, rotary
  positions (precomputed cos/sin, rotate_half layout), grouped-query attention
  by repeat_kv, SwiGLU, final norm, no biases.
All three match sqlgpt where it differs from their originals: dropout only on
each sublayer's output (none on embeddings or attention probabilities) and
cross-entropy ignoring <pad> (id 0). A per-layer key/value cache (of the kv
heads only) makes greedy decoding O(T) per token, the fair opponent for
generation speed.

build(arch_dict) picks the class from a dict of ArchConfig fields (plus
dropout); load_sqlgpt_weights places sqlgpt's tensors by reading the tensor
table (NanoGPT and Llama name their modules as transformers does, so each
spec's hf name is the parameter's name).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from sqlgpt.model.arch import ArchConfig, tensor_table

IGNORE = -1  # the target the loss skips, as sqlgpt's
INIT_STD = 0.02  # GPT-2's (and llama2.c's) normal init, for training from scratch


class Peer(nn.Module):
    """What the three models share: the loss, weight loading and greedy
    decoding. A subclass defines logits(ids, caches, pos) and param_name(spec)."""
    FIXED = {}    # ArchConfig fields the subclass hard-codes
    GQA = False   # whether it has grouped-query attention

    def __init__(self, arch, dropout):
        super().__init__()
        self.arch, self.dropout = arch, dropout

    def forward(self, ids, targets=None, caches=None, pos=0):
        """Logits (B, T, V), or the mean loss when targets are given.
        caches: per layer (keys, values), each (B, KVH, max_len, hs); the
        positions pos..pos+T-1 are computed and written into them."""
        logits = self.logits(ids, caches, pos)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=IGNORE)

    def load_sqlgpt_weights(self, weights):
        """Copy sqlgpt's {name: (in, out) array} into this model: nn.Linear
        stores (out, in), hence the transposes; a fused tensor (c_attn) takes
        its parts in table order along out. Every parameter starts as NaN, so
        one the table leaves unset fails here rather than in a loss check."""
        params = dict(self.named_parameters())  # a tied head is listed once, as wte
        with torch.no_grad():
            for p in params.values():
                p.fill_(float("nan"))
            offsets = {}  # fused parameter -> where its next part starts along out
            for spec in tensor_table(self.arch):
                if spec.tied_to:
                    continue
                name, part = self.param_name(spec)
                value = torch.as_tensor(weights[spec.name])
                if isinstance(self.get_submodule(name.rpartition(".")[0]), nn.Linear):
                    value = value.T if value.dim() == 2 else value
                target = params[name]
                if part is not None:
                    start = offsets.get(name, 0)
                    offsets[name] = start + value.shape[0]
                    target = target[start:start + value.shape[0]]
                assert target.shape == value.shape, (spec.name, name, part)
                target.copy_(value)
        unset = [name for name, p in params.items() if p.isnan().any()]
        assert not unset, f"the tensor table leaves these unset: {unset}"

    def param_name(self, spec):
        """(this model's parameter name, part) of a TensorSpec: transformers'
        names, which NanoGPT and Llama use."""
        return spec.hf

    @torch.inference_mode()
    def generate_greedy(self, prompt_ids, max_tokens):
        """max_tokens greedy ids after prompt_ids (a list, or a batch: a list
        of equally long lists), with a KV cache: the prompt in one pass, then
        one token per sequence per forward."""
        batch = [prompt_ids] if not isinstance(prompt_ids[0], list) else prompt_ids
        total = len(batch[0]) + max_tokens
        assert total <= self.arch.seq_len, "the KV cache covers one context window"
        shape = (len(batch), self.arch.n_kv_heads, total, self.arch.head_dim)
        dtype = next(self.parameters()).dtype
        caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                  for _ in range(self.arch.num_layers)]
        ids, pos, out = torch.tensor(batch), 0, []
        for _ in range(max_tokens):
            logits = self(ids, caches=caches, pos=pos)
            pos += ids.shape[1]
            tokens = logits[:, -1].argmax(-1)
            out.append(tokens.tolist())
            ids = tokens[:, None]
        columns = [list(seq) for seq in zip(*out)]
        return columns if batch is prompt_ids else columns[0]

    def init_normal(self, residual_suffixes):
        """GPT-2's init: N(0, 0.02) matrices and embeddings, zero biases, unit
        norm gains, and the residual projections scaled by 1/sqrt(2 layers)."""
        residual_std = INIT_STD / (2 * self.arch.num_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, residual_std if name.endswith(residual_suffixes)
                                else INIT_STD)
            elif name.endswith("weight"):  # the only 1-D weights are norm gains
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)


def with_cache(cache, k, v, pos):
    """k, v (B, KVH, T, hs) written into cache at pos, and the keys and values
    of every position so far. SDPA's causal mask is aligned top-left, so a
    multi-token chunk must start at position 0 (the prompt); a single new
    token simply sees every key."""
    T = k.shape[2]
    assert T == 1 or pos == 0, "only the prompt may be processed as a chunk"
    if cache is None:
        return k, v
    keys, values = cache
    keys[:, :, pos:pos + T], values[:, :, pos:pos + T] = k, v
    return keys[:, :, :pos + T], values[:, :, :pos + T]


# ---- lua: the original script's model ----
class Attention(nn.Module):
    def __init__(self, embed_dim, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.proj = (nn.Linear(embed_dim, embed_dim, bias=False)
                                             for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def _split_heads(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = (self._split_heads(f(x)) for f in (self.q, self.k, self.v))
        k, v = with_cache(cache, k, v, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        C, hidden = arch.embed_dim, arch.hidden_dim
        self.ln1 = nn.LayerNorm(C, eps=arch.norm_eps, elementwise_affine=False)
        self.attn = Attention(C, arch.num_heads, dropout)
        self.ln2 = nn.LayerNorm(C, eps=arch.norm_eps, elementwise_affine=False)
        self.fc1 = nn.Linear(C, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, C, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.drop(self.fc2(F.relu(self.fc1(self.ln2(x)))))


class TorchGPT(Peer):
    """The lua preset (any sizes)."""
    FIXED = dict(norm="layernorm", norm_affine=False, pos="learned", mlp="relu", bias=False,
                 tie_weights=False, final_norm=False)
    LAYER_MODULES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "proj": "attn.proj",
                     "fc1": "fc1", "fc2": "fc2"}  # table component -> module in a Block

    def __init__(self, arch, dropout=0.0):
        super().__init__(arch, dropout)
        C, V = arch.embed_dim, arch.n_vocab
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(arch.seq_len, C)
        self.blocks = nn.ModuleList(Block(arch, dropout) for _ in range(arch.num_layers))
        self.head = nn.Linear(C, V, bias=False)

    def logits(self, ids, caches=None, pos=0):
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(pos, pos + T, device=ids.device))
        for layer, block in enumerate(self.blocks):
            x = block(x, caches[layer] if caches else None, pos)
        return self.head(x)

    def param_name(self, spec):
        if spec.layer is None:
            return f"{spec.name}.weight", None
        return f"blocks.{spec.layer}.{self.LAYER_MODULES[spec.component]}.weight", None


# ---- gpt2: nanoGPT's model.py ----
class CausalSelfAttention(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        self.n_head, self.n_embd = arch.num_heads, arch.embed_dim
        # key, query, value projections for all heads, in one batched matmul
        self.c_attn = nn.Linear(self.n_embd, 3 * self.n_embd, bias=arch.bias)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=arch.bias)
        # sqlgpt drops the sublayer's output only (nanoGPT also drops attention probabilities)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k, v = with_cache(cache, k, v, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        self.c_fc = nn.Linear(arch.embed_dim, arch.hidden_dim, bias=arch.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's form (nanoGPT uses the exact erf)
        self.c_proj = nn.Linear(arch.hidden_dim, arch.embed_dim, bias=arch.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(arch.embed_dim, eps=arch.norm_eps, bias=arch.bias)
        self.attn = CausalSelfAttention(arch, dropout)
        self.ln_2 = nn.LayerNorm(arch.embed_dim, eps=arch.norm_eps, bias=arch.bias)
        self.mlp = MLP(arch, dropout)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(Peer):
    """The gpt2 preset (biases and tying optional, as nanoGPT's config)."""
    FIXED = dict(norm="layernorm", norm_affine=True, pos="learned", mlp="gelu", final_norm=True)

    def __init__(self, arch, dropout=0.0):
        super().__init__(arch, dropout)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(arch.n_vocab, arch.embed_dim),
            wpe=nn.Embedding(arch.seq_len, arch.embed_dim),
            h=nn.ModuleList(NanoBlock(arch, dropout) for _ in range(arch.num_layers)),
            ln_f=nn.LayerNorm(arch.embed_dim, eps=arch.norm_eps, bias=arch.bias),
        ))
        self.lm_head = nn.Linear(arch.embed_dim, arch.n_vocab, bias=False)
        if arch.tie_weights:  # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        self.init_normal(residual_suffixes=("c_proj.weight",))

    def logits(self, ids, caches=None, pos=0):
        t = ids.size(1)
        positions = torch.arange(pos, pos + t, dtype=torch.long, device=ids.device)  # (t)
        x = self.transformer.wte(ids) + self.transformer.wpe(positions)  # no embedding dropout
        for layer, block in enumerate(self.transformer.h):
            x = block(x, caches[layer] if caches else None, pos)
        return self.lm_head(self.transformer.ln_f(x))


# ---- llama: llama2.c's model.py, with transformers' names ----
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def precompute_rotary(head_dim, end, theta):
    """cos and sin (end, head_dim) for rotate_half's layout: channel i pairs
    with i + head_dim/2 and turns by t * theta^(-2i/head_dim). Float64, so a
    float64 model is exact; forward casts the rows it uses."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(end, dtype=torch.float64), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """x (B, H, T, hs); cos, sin (T, hs)."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):
    """(B, KVH, T, hs) -> (B, KVH * n_rep, T, hs): each kv head serves n_rep
    consecutive query heads."""
    B, KVH, T, hs = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None].expand(B, KVH, n_rep, T, hs).reshape(B, KVH * n_rep, T, hs)


class LlamaAttention(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        self.n_heads, self.n_kv_heads = arch.num_heads, arch.n_kv_heads
        self.head_dim = arch.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        C, kv_dim = arch.embed_dim, arch.kv_dim
        self.q_proj = nn.Linear(C, C, bias=arch.bias)
        self.k_proj = nn.Linear(C, kv_dim, bias=arch.bias)
        self.v_proj = nn.Linear(C, kv_dim, bias=arch.bias)
        self.o_proj = nn.Linear(C, C, bias=arch.bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, rotary, cache=None, pos=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        k, v = with_cache(cache, k, v, pos)  # the cache holds the kv heads only
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, NH, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        C, hidden = arch.embed_dim, arch.hidden_dim
        self.gate_proj = nn.Linear(C, hidden, bias=arch.bias)
        self.up_proj = nn.Linear(C, hidden, bias=arch.bias)
        self.down_proj = nn.Linear(hidden, C, bias=arch.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaBlock(nn.Module):
    def __init__(self, arch, dropout):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.embed_dim, arch.norm_eps)
        self.self_attn = LlamaAttention(arch, dropout)
        self.post_attention_layernorm = RMSNorm(arch.embed_dim, arch.norm_eps)
        self.mlp = FeedForward(arch, dropout)

    def forward(self, x, rotary, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(Peer):
    """The llama preset (kv heads, biases and tying optional)."""
    FIXED = dict(norm="rmsnorm", norm_affine=True, pos="rope", mlp="swiglu", final_norm=True)
    GQA = True

    def __init__(self, arch, dropout=0.0):
        super().__init__(arch, dropout)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(arch.n_vocab, arch.embed_dim),
            layers=nn.ModuleList(LlamaBlock(arch, dropout) for _ in range(arch.num_layers)),
            norm=RMSNorm(arch.embed_dim, arch.norm_eps),
        ))
        self.lm_head = nn.Linear(arch.embed_dim, arch.n_vocab, bias=False)
        if arch.tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = precompute_rotary(arch.head_dim, arch.seq_len, arch.rope_theta)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.init_normal(residual_suffixes=("o_proj.weight", "down_proj.weight"))

    def logits(self, ids, caches=None, pos=0):
        T = ids.shape[1]
        x = self.model.embed_tokens(ids)
        rotary = (self.rotary_cos[pos:pos + T].to(x.dtype),
                  self.rotary_sin[pos:pos + T].to(x.dtype))
        for layer, block in enumerate(self.model.layers):
            x = block(x, rotary, caches[layer] if caches else None, pos)
        return self.lm_head(self.model.norm(x))


PEERS = (TorchGPT, NanoGPT, Llama)


def build(arch_dict):
    """The peer for a dict of ArchConfig fields (other keys ignored) with an
    optional dropout. Raises ValueError for an architecture none is written
    for: racing a different model would measure nothing."""
    arch = ArchConfig.from_dict(arch_dict).validate()
    for model in PEERS:
        if (all(getattr(arch, k) == v for k, v in model.FIXED.items())
                and (model.GQA or arch.n_kv_heads == arch.num_heads)):
            return model(arch, arch_dict.get("dropout", 0.0))
    raise ValueError(f"no PyTorch peer for {arch}")


def adam(model, lr):
    """Adam as sqlgpt's (betas 0.9/0.999, eps 1e-8, no weight decay), using
    PyTorch's fused CPU kernel where this version has it: the fastest
    baseline is the honest one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
