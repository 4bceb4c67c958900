"""Architectures the model tests run over: the presets, then parts mixed as
no preset does, so that every option value meets several others."""
from sqlgpt.model.arch import preset

SMALL = dict(n_vocab=40, embed_dim=32, num_heads=4, num_layers=2, seq_len=16)

# name -> (preset, overrides)
ARCHITECTURES = {
    "lua": ("lua", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-no-bias": ("gpt2", dict(bias=False)),
    "llama": ("llama", dict(kv_heads=2)),
    "llama-mqa-tied-bias": ("llama", dict(kv_heads=1, tie_weights=True, bias=True)),
    "llama-ffn": ("llama", dict(ffn_dim=40, rope_theta=500.0)),
    "layernorm-rope-swiglu": ("lua", dict(pos="rope", mlp="swiglu", norm_affine=True)),
    "rmsnorm-learned-gelu": ("llama", dict(pos="learned", mlp="gelu", bias=True,
                                           tie_weights=True)),
    "rmsnorm-plain-sinusoidal-relu": ("llama", dict(norm_affine=False, pos="sinusoidal",
                                                    mlp="relu", kv_heads=2)),
    "layernorm-nopos-bias-mqa": ("gpt2", dict(pos="none", mlp="relu", kv_heads=1,
                                              tie_weights=False)),
    "plain-final-norm-sinusoidal": ("lua", dict(final_norm=True, pos="sinusoidal", mlp="gelu",
                                                tie_weights=True)),
    "odd-sizes": ("llama", dict(embed_dim=24, num_heads=4, kv_heads=2, seq_len=13)),
    # biases on q, k and v alone: Qwen2's layout, and on a GPT-2-like block
    "qwen2": ("llama", dict(kv_heads=2, qkv_bias=True)),
    "layernorm-qkv-bias": ("gpt2", dict(bias=False, qkv_bias=True, tie_weights=False)),
    # heads whose widths do not add up to embed_dim (num_heads x head_size != C)
    "llama-wide-heads": ("llama", dict(kv_heads=2, head_size=12, qkv_bias=True)),
    "gpt2-narrow-heads": ("gpt2", dict(head_size=6, num_heads=3)),
}


def arch_of(name, **more):
    base, overrides = ARCHITECTURES[name]
    return preset(base, **{**SMALL, **overrides, **more})
