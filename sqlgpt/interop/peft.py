"""A LoRA fine-tune as a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors), for the transformers export of its base
(hf.py)."""
import json

import numpy as np

from ..errors import SqlgptError
from ..model.arch import tensor_table
from .hf import (GPT2, LLAMA, _repeat_kv, check_new_directory, family, new_directory,
                 write_safetensors)


def peft_tensors(arch, lora, adapters):
    """({PEFT name: array}, rank_pattern, alpha_pattern) of a fine-tune's
    adapters (adapters: {name: array}, sqlgpt's layers.N.site.lora_a/b),
    named for the transformers export of its base: lora_A.weight (rank, in)
    = A^T, lora_B.weight (out, rank) = B^T, on the module the tensor table's
    hf column names. GPT-2 fuses q, k and v into c_attn: their adapters
    become one of rank (parts x rank) on it, block by block (A's stacked,
    each B in its part's rows), with alpha scaled alike so that alpha / rank
    is unchanged: the same update, exactly."""
    kind = family(arch)
    table = {spec.name: spec for spec in tensor_table(arch)}
    out, fused = {}, {}
    for layer in range(arch.num_layers):
        for site in lora.sites:
            a = adapters[f"layers.{layer}.{site}.lora_a"]
            b = adapters[f"layers.{layer}.{site}.lora_b"]
            hf_name, part = table[f"layers.{layer}.{site}"].hf
            module = "base_model.model." + hf_name[:-len(".weight")]
            if part is None:
                out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
                out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
            else:
                if site in ("k", "v"):
                    b = _repeat_kv(arch, b)  # GPT-2's k and v span every head
                fused.setdefault(module, []).append((part, a, b))
    patterns = {}
    for module, parts in fused.items():  # c_attn's output is [q | k | v], each C wide
        C, r = arch.embed_dim, lora.rank
        big_a = np.concatenate([a.T for _, a, _ in sorted(parts, key=lambda p: p[0])], axis=0)
        big_b = np.zeros((3 * C, r * len(parts)), np.float32)
        for i, (part, _, b) in enumerate(sorted(parts, key=lambda p: p[0])):
            big_b[part * C:(part + 1) * C, i * r:(i + 1) * r] = b.T
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = big_a, big_b
        patterns[module.rsplit(".", 2)[-2] + "." + module.rsplit(".", 1)[-1]] = len(parts)
    if kind == LLAMA:
        patterns = {}
    return out, patterns


def export_peft(model, out_dir):
    """Write a LoRA fine-tune (an api.Model) as a PEFT adapter directory:
    adapter_config.json and adapter_model.safetensors, for the transformers
    export of its base (sqlgpt export --db BASE --format hf). Returns the
    files written."""
    lora = model.lora
    if lora is None:
        raise SqlgptError("only a LoRA fine-tune exports as peft (sqlgpt finetune); export a "
                          "plain model with --format hf")
    check_new_directory(out_dir)
    arch, kind = model.arch, family(model.arch)
    adapters = {t.name: t.data for t in model._gpt.params}
    tensors, parts = peft_tensors(arch, lora, adapters)
    modules = sorted({".".join(name.split(".")[-4:-2]) for name in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
              "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": modules, "fan_in_fan_out": kind == GPT2, "bias": "none",
              "rank_pattern": {m: lora.rank * n for m, n in parts.items()},
              "alpha_pattern": {m: lora.alpha * n for m, n in parts.items()},
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": None}
    with new_directory(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / "adapter_model.safetensors", tensors)
    return ["adapter_config.json", "adapter_model.safetensors"]
