"""LoRA adapters: the kernel's forward and backward through them against the
PyTorch reference with PEFT's formula (y = x W + b + scale B(A(drop(x)))),
for every architecture; the frozen base; merging."""
import numpy as np
import pytest
import torch

from sqlgpt._kernel import lib
from sqlgpt.errors import SqlgptError
from sqlgpt.lora import SITES, LoraConfig, adaptable, lora_seeds, merged
from sqlgpt.model import GPT
from sqlgpt.tensor import fptr

from architectures import ARCHITECTURES, arch_of
from torch_reference import random_weights, reference_loss


def lora_model(arch, rng, lora):
    """A GPT with random base weights and random (not zero) adapters, so that
    both A's and B's gradients are exercised."""
    base = random_weights(arch, rng)
    model = GPT(arch, lora=lora)
    for t in model.base:
        t.data[...] = base[t.name].numpy()
    for t in model.params:
        t.data[...] = 0.1 * rng.standard_normal(t.shape)
    return model


def site_masks(arch, p, seed, rows, lora):
    """The kernel's dropout mask (scaled) of every adapted site's input."""
    seeds = lora_seeds(seed, arch.num_layers)
    widths = {"fc2": arch.hidden_dim}
    masks = {}
    for layer in range(arch.num_layers):
        for site in lora.sites:
            shape = (rows, widths.get(site, arch.embed_dim))
            ones, mask = np.ones(shape, np.float32), np.zeros(shape, np.float32)
            lib.dropout_forward(fptr(mask), fptr(ones), mask.size, p,
                                seeds[layer * len(SITES) + SITES.index(site)])
            masks[layer, site] = torch.tensor(mask, dtype=torch.float64)
    return masks


def compare(arch, rng, lora, dropout=0.0):
    model = lora_model(arch, rng, lora)
    B, T = 2, arch.seq_len
    ids = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    targets = rng.integers(1, arch.n_vocab, (B, T)).astype(np.int32)
    seed = int(rng.integers(0, 2**63))
    model.params.zero_grad()
    loss = model.forward(ids, targets, dropout=dropout, dropout_seed=seed)
    model.backward()
    weights = {t.name: torch.tensor(t.data, dtype=torch.float64) for t in model.base}
    adapters = {t.name: torch.tensor(t.data, dtype=torch.float64, requires_grad=True)
                for t in model.params}
    masks = site_masks(arch, lora.dropout, seed, B * T, lora) if lora.dropout else {}
    ref_lora = {"scale": lora.scale, "masks": {k: m.view(B, T, -1) for k, m in masks.items()},
                "adapters": {(layer, site): (adapters[f"layers.{layer}.{site}.lora_a"],
                                             adapters[f"layers.{layer}.{site}.lora_b"])
                             for layer in range(arch.num_layers) for site in lora.sites}}
    ref = reference_loss(weights, arch, torch.tensor(ids, dtype=torch.long),
                         torch.tensor(targets, dtype=torch.long),
                         relu_signs=[L["h"] for L in model.acts.layers], lora=ref_lora)
    ref.backward()
    assert abs(loss - ref.item()) / ref.item() < 1e-5
    for t in model.params:
        expected = adapters[t.name].grad.numpy()
        err = np.linalg.norm(t.grad - expected) / max(np.linalg.norm(expected), 1e-12)
        assert err < 1e-4, (t.name, err)
    return model


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_adapter_gradient_matches_pytorch(rng, name):
    arch = arch_of(name)
    compare(arch, rng, LoraConfig(rank=4, alpha=8, targets=",".join(adaptable(arch))))


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama"])
def test_adapter_dropout_matches_pytorch_with_the_same_masks(rng, name):
    arch = arch_of(name)
    compare(arch, rng, LoraConfig(rank=3, alpha=5, targets=",".join(adaptable(arch)),
                                  dropout=0.3), dropout=0.0)


def test_the_default_targets_and_recomputed_activations(rng):
    arch = arch_of("llama", num_layers=3)
    compare(arch, rng, LoraConfig())
    model = lora_model(arch, rng, LoraConfig(rank=2, targets="k,fc2"))
    ids = rng.integers(0, arch.n_vocab, (2, arch.seq_len)).astype(np.int32)
    grads = []
    for recompute in (False, True):
        model.checkpoint_activations = recompute
        model.params.zero_grad()
        model.forward(ids, ids, dropout=0.0, dropout_seed=1)
        model.backward()
        grads.append(model.params.arenas["grad"].copy())
    assert np.array_equal(*grads)


def test_a_new_adapter_leaves_the_base_exactly_and_the_base_has_no_gradient(rng):
    arch = arch_of("gpt2")
    base = lora_model(arch, rng, LoraConfig())
    plain = GPT(arch)
    for t in plain.params:
        t.data[...] = base.base[t.name].data
    base.init_weights(rng)  # A random, B zero
    ids = rng.integers(0, arch.n_vocab, (2, arch.seq_len)).astype(np.int32)
    assert base.forward(ids, ids) == plain.forward(ids, ids)
    assert set(base.base.arenas) == {"data"}  # no gradient or moments for frozen weights
    assert all(not t.name.endswith("lora_b") or not t.data.any() for t in base.params)


def test_merged_weights_give_the_adapters_logits(rng):
    arch = arch_of("llama")
    model = lora_model(arch, rng, LoraConfig(rank=4, targets="q,v,fc1"))
    plain = GPT(arch)
    for name, data in merged(model).items():
        plain.params[name].data[...] = data
    ids = rng.integers(0, arch.n_vocab, (2, arch.seq_len)).astype(np.int32)
    model.forward(ids)
    ours = model.acts.logits.copy()
    plain.forward(ids)
    assert np.abs(plain.acts.logits - ours).max() < 1e-5


@pytest.mark.parametrize("settings, message", [
    (dict(rank=0), "--lora-rank must be an integer from 1"),
    (dict(rank=33), "--lora-rank must be an integer from 1 to the model's width 32"),
    (dict(targets="q,wq"), "unknown --lora-targets wq"),
    (dict(targets="gate"), "unknown --lora-targets gate"),  # gpt2 has no gate
    (dict(targets=","), "names no matrix"),
    (dict(targets="q,q"), "names a matrix twice"),
    (dict(alpha=0), "--lora-alpha must be a number above 0"),
    (dict(dropout=1.0), "--lora-dropout must be in"),
])
def test_impossible_adapters_are_one_line_errors(settings, message):
    with pytest.raises(SqlgptError, match=message):
        GPT(arch_of("gpt2"), lora=LoraConfig(**settings))
