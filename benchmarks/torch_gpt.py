"""The `lua` preset written as an ordinary PyTorch model: the baseline that
benchmarks/bench.py measures sqlgpt against.

Same architecture as sqlgpt's model (and as tests/test_model_grad.py's
reference): token + learned position embeddings, pre-norm blocks with
parameter-free layernorm, causal multi-head attention with bias-free q, k, v
and proj, dropout after proj and after fc2, ReLU MLP 4x, no biases, no final
norm, an untied bias-free head, cross-entropy ignoring <pad> (id 0).

Written the way a PyTorch user would (nn.Linear, scaled_dot_product_attention),
so the comparison is with idiomatic PyTorch, not with a port of sqlgpt. A
per-layer key/value cache makes its greedy decoding O(T) per token, the fair
opponent for generation speed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_ID = 0
LN_EPS = 1e-5


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
        """cache: this layer's (keys, values), each (B, NH, max_len, head_dim);
        the new positions pos..pos+T-1 are written into it and attention runs
        over everything cached so far."""
        B, T, C = x.shape
        q, k, v = (self._split_heads(f(x)) for f in (self.q, self.k, self.v))
        if cache is not None:
            keys, values = cache
            keys[:, :, pos:pos + T], values[:, :, pos:pos + T] = k, v
            k, v = keys[:, :, :pos + T], values[:, :, :pos + T]
        # SDPA's causal mask is aligned top-left, so a multi-token chunk must start
        # at position 0 (the prompt); a single new token simply sees every key.
        assert T == 1 or pos == 0, "only the prompt may be processed as a chunk"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, embed_dim, num_heads, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim, eps=LN_EPS, elementwise_affine=False)
        self.attn = Attention(embed_dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(embed_dim, eps=LN_EPS, elementwise_affine=False)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim, bias=False)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.drop(self.fc2(F.relu(self.fc1(self.ln2(x)))))


class TorchGPT(nn.Module):
    """Built from the same settings dict as sqlgpt's Config (vocab_size,
    embed_dim, num_heads, num_layers, seq_len, dropout)."""

    def __init__(self, arch):
        super().__init__()
        C, V = arch["embed_dim"], arch["vocab_size"] + 2  # + <pad> and <unk>
        self.arch = arch
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(arch["seq_len"], C)
        self.blocks = nn.ModuleList(Block(C, arch["num_heads"], arch["dropout"])
                                    for _ in range(arch["num_layers"]))
        self.head = nn.Linear(C, V, bias=False)

    def forward(self, ids, targets=None, caches=None, pos=0):
        """Logits (B, T, V), or the mean loss when targets are given."""
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(pos, pos + T, device=ids.device))
        for layer, block in enumerate(self.blocks):
            x = block(x, caches[layer] if caches else None, pos)
        logits = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=PAD_ID)

    def load_sqlgpt_weights(self, weights):
        """Copy sqlgpt's {name: (in, out) float32 array} into this model
        (nn.Linear stores (out, in), hence the transposes)."""
        with torch.no_grad():
            self.wte.weight.copy_(torch.from_numpy(weights["wte"]))
            self.wpe.weight.copy_(torch.from_numpy(weights["wpe"]))
            self.head.weight.copy_(torch.from_numpy(weights["head"]).T)
            for layer, block in enumerate(self.blocks):
                linears = {"q": block.attn.q, "k": block.attn.k, "v": block.attn.v,
                           "proj": block.attn.proj, "fc1": block.fc1, "fc2": block.fc2}
                for name, linear in linears.items():
                    linear.weight.copy_(torch.from_numpy(weights[f"layers.{layer}.{name}"]).T)

    @torch.inference_mode()
    def generate_greedy(self, prompt_ids, max_tokens):
        """max_tokens greedy ids after prompt_ids (a list), with a KV cache:
        the prompt in one pass, then one token per forward."""
        total = len(prompt_ids) + max_tokens
        assert total <= self.arch["seq_len"], "the KV cache covers one context window"
        C, NH = self.arch["embed_dim"], self.arch["num_heads"]
        caches = [(torch.zeros(1, NH, total, C // NH), torch.zeros(1, NH, total, C // NH))
                  for _ in self.blocks]
        ids, pos, out = torch.tensor([prompt_ids]), 0, []
        for _ in range(max_tokens):
            logits = self(ids, caches=caches, pos=pos)
            pos += ids.shape[1]
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
        return out


def adam(model, lr):
    """Adam as sqlgpt's (betas 0.9/0.999, eps 1e-8, no weight decay), using
    PyTorch's fused CPU kernel where this version has it: the fastest
    baseline is the honest one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
