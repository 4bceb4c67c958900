"""transformers' own GPT-2 and llama, loaded with sqlgpt weights in float64:
a second, third-party implementation of the gpt2 and llama presets.

The weights are placed by reading each TensorSpec's `hf` field (name, part),
so comparing these models with tests/torch_reference.py checks the reference
and arch.py's name map together. Layouts: GPT-2's Conv1D weights are (in,
out) like sqlgpt's and c_attn is [q | k | v] along out; nn.Linear weights
(llama's, and an untied lm_head) are (out, in), so they are transposed;
embeddings and vectors copy as they are.
"""
import types

import torch
import transformers

from sqlgpt.model.arch import tensor_table

# what each of transformers' models hard-codes; anything else cannot be built
GPT2_ARCH = dict(norm="layernorm", norm_affine=True, bias=True, mlp="gelu", pos="learned",
                 final_norm=True)
LLAMA_ARCH = dict(norm="rmsnorm", norm_affine=True, mlp="swiglu", pos="rope", final_norm=True)


def hf_model(arch, weights):
    """A float64 transformers model of arch in eval mode holding weights
    ({name: tensor} of arch's stored tensors). Raises ValueError for an
    architecture neither GPT-2 nor llama can express."""
    if arch.mlp == "swiglu" or arch.norm == "rmsnorm":
        _require(arch, LLAMA_ARCH)
        model = transformers.LlamaForCausalLM(_llama_config(arch))
    else:
        _require(arch, GPT2_ARCH)
        if arch.n_kv_heads != arch.num_heads:
            raise ValueError("GPT-2 has no grouped-query attention")
        model = transformers.GPT2LMHeadModel(_gpt2_config(arch))
    model = model.to(torch.float64).eval()
    _load(model, arch, weights)
    if isinstance(model, transformers.LlamaForCausalLM):
        _llama_in_float64(model, arch)
    return model


def _require(arch, fixed):
    wrong = {k: getattr(arch, k) for k, v in fixed.items() if getattr(arch, k) != v}
    if wrong:
        raise ValueError(f"transformers' model needs {fixed}, got {wrong}")


def _gpt2_config(arch):
    return transformers.GPT2Config(
        vocab_size=arch.n_vocab, n_positions=arch.seq_len, n_embd=arch.embed_dim,
        n_layer=arch.num_layers, n_head=arch.num_heads, n_inner=arch.hidden_dim,
        layer_norm_epsilon=arch.norm_eps, activation_function="gelu_new",
        tie_word_embeddings=arch.tie_weights, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager")


def _llama_config(arch):
    # sdpa, not eager: eager's softmax runs in float32 even for float64 inputs
    return transformers.LlamaConfig(
        vocab_size=arch.n_vocab, hidden_size=arch.embed_dim, intermediate_size=arch.hidden_dim,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.n_kv_heads, rms_norm_eps=arch.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        max_position_embeddings=arch.seq_len, tie_word_embeddings=arch.tie_weights,
        attention_bias=arch.bias, mlp_bias=arch.bias, attn_implementation="sdpa")


def _load(model, arch, weights):
    """Copy every stored tensor to the place its spec's hf field names.
    Every parameter starts as NaN, so one the table does not fill (or a
    fused one it fills only in part) shows as NaN and fails here."""
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))
        offsets = {}  # fused tensor -> where its next part starts along out
        for spec in tensor_table(arch):
            if spec.tied_to:
                continue
            if spec.hf is None:
                raise ValueError(f"{spec.name} has no hf name")
            name, part = spec.hf
            value = weights[spec.name]
            module = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, torch.nn.Linear) and value.dim() == 2:
                value = value.T  # nn.Linear stores (out, in)
            target = params[name]
            if part is not None:
                start = offsets.get(name, 0)
                offsets[name] = start + value.shape[-1]
                target = target[..., start:start + value.shape[-1]]
            if target.shape != value.shape:
                raise ValueError(f"{spec.name} {tuple(value.shape)} does not fit {name} "
                                 f"{tuple(target.shape)} (part {part})")
            target.copy_(value)
    unfilled = [name for name, p in params.items() if p.isnan().any()]
    if unfilled:
        raise ValueError(f"the tensor table leaves these unset: {unfilled}")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != arch.tie_weights:
        raise ValueError(f"lm_head tied to the embedding: {tied}, arch says {arch.tie_weights}")


def _llama_in_float64(model, arch):
    """transformers' llama computes RMSNorm and the rotary angles in float32
    whatever the model's dtype (right for bf16 training, ~1e-7 off here).
    Only those two computations are replaced, by float64 ones of the same
    formulas; rotate_half, its application to q and k, GQA and the rest stay
    transformers' own."""
    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) +
                                              self.variance_epsilon))

    def rotary(self, x, position_ids):
        hs = arch.head_dim
        inv_freq = arch.rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        angle = position_ids[..., None].to(torch.float64) * inv_freq
        angle = torch.cat([angle, angle], dim=-1)
        return angle.cos().to(x.dtype), angle.sin().to(x.dtype)

    for module in model.modules():
        if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
            module.forward = types.MethodType(rms_norm, module)
    model.model.rotary_emb.forward = types.MethodType(rotary, model.model.rotary_emb)
