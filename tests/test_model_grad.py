"""The whole model's loss and every parameter gradient, for every preset and
a grid of part combinations, against the independent PyTorch reference
(tests/torch_reference.py) given the same weights, in float64; and its
logits against transformers' GPT2LMHeadModel and LlamaForCausalLM."""
import numpy as np
import pytest
import torch

from sqlgpt._kernel import lib
from sqlgpt.model.arch import preset
from sqlgpt.errors import SqlgptError
from sqlgpt.model.dropout import dropout_seeds
from sqlgpt.model.model import GPT
from sqlgpt.model.tensor import fptr

from helpers import rel_err
from architectures import ARCHITECTURES, SMALL, arch_of
from torch_reference import random_weights, reference_loss

def model_with(arch, weights):
    """A GPT holding the reference's weights (rounded to float32)."""
    model = GPT(arch)
    for t in model.params:
        t.data[...] = weights[t.name].numpy()
    return model


def compare(arch, rng, dropout=0.0, embed_scale=1.0, dtype=torch.float64):
    """Our loss and gradients and the reference's for one random batch:
    (model, our loss, reference weights with .grad, reference loss)."""
    weights = random_weights(arch, rng)
    weights["wte"] *= embed_scale
    model = model_with(arch, weights)
    B, T = 3, arch.seq_len
    ids = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    targets = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    targets[0, :5] = -1  # IGNORE: positions the loss skips
    seed = int(rng.integers(0, 2**63)) if dropout else None
    model.params.zero_grad()
    loss = model.forward(ids, targets, dropout=dropout, dropout_seed=seed)
    model.backward()
    ref_weights = {t.name: torch.tensor(t.data, dtype=dtype, requires_grad=True)
                   for t in model.params}
    masks = dropout_masks(arch, dropout, seed, (B, T, arch.embed_dim)) if dropout else None
    ref = reference_loss(ref_weights, arch, torch.tensor(ids, dtype=torch.long),
                         torch.tensor(targets, dtype=torch.long), masks=masks,
                         relu_signs=[L["h"] for L in model.acts.layers])
    ref.backward()
    return model, loss, ref_weights, ref.item()


def dropout_masks(arch, p, seed, shape):
    """The kernel's dropout masks (already scaled by 1/(1-p)) for every site."""
    masks = []
    for site_seed in dropout_seeds(seed, arch.num_layers):
        ones, mask = np.ones(shape, np.float32), np.zeros(shape, np.float32)
        lib.dropout_forward(fptr(mask), fptr(ones), mask.size, p, site_seed)
        masks.append(torch.tensor(mask, dtype=torch.float64))
    return masks


def assert_matches(model, loss, ref_weights, ref, tol=1e-4):
    """Loss and every gradient within tol, relative. A gradient that is zero
    in exact arithmetic (the key bias: softmax ignores a score shift common
    to all keys) is measured against the whole gradient's size instead."""
    assert abs(loss - ref) / ref < tol
    total = np.sqrt(sum(float((w.grad ** 2).sum()) for w in ref_weights.values()))
    for t in model.params:
        expected = ref_weights[t.name].grad.numpy()
        err = np.linalg.norm(t.grad - expected) / max(np.linalg.norm(expected), 1e-3 * total)
        assert err < tol, (t.name, err)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_model_gradients_match_pytorch(rng, name):
    assert_matches(*compare(arch_of(name), rng))


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama", "rmsnorm-learned-gelu"])
def test_training_mode_gradients_match_pytorch_with_the_same_masks(rng, name):
    assert_matches(*compare(arch_of(name, num_layers=3), rng, dropout=0.3))


def test_lua_at_its_width_matches_pytorch(rng):
    """Token embeddings are scaled up 5x from the original's init: at its init
    the residual stream is ~0.03 and float32 itself (PyTorch included) loses
    ~3e-4 of relative accuracy in the early layers' gradients; the next test
    covers that regime."""
    arch = preset("lua", n_vocab=428, embed_dim=128, num_heads=8, num_layers=6, seq_len=64)
    assert_matches(*compare(arch, rng, embed_scale=5.0))


def original_init_comparison(seed, dtype):
    arch = preset("lua", n_vocab=428, embed_dim=128, num_heads=8, num_layers=6, seq_len=64)
    rng = np.random.default_rng(seed)
    model = GPT(arch)
    model.init_weights(rng)
    B, T = 3, arch.seq_len
    ids = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    targets = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    model.params.zero_grad()
    loss = model.forward(ids, targets)
    model.backward()
    weights = {t.name: torch.tensor(t.data, dtype=dtype, requires_grad=True)
               for t in model.params}
    ref = reference_loss(weights, arch, torch.tensor(ids, dtype=torch.long),
                         torch.tensor(targets, dtype=torch.long),
                         relu_signs=[L["h"] for L in model.acts.layers])
    ref.backward()
    return model, loss, weights, ref.item()


def test_at_the_original_init_we_are_as_accurate_as_pytorch_float32():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    model, loss, exact, ref = original_init_comparison(seed, torch.float64)
    _, _, torch32, _ = original_init_comparison(seed, torch.float32)
    assert abs(loss - ref) / ref < 1e-5
    for t in model.params:
        ours = rel_err(t.grad, exact[t.name].grad)
        theirs = rel_err(torch32[t.name].grad, exact[t.name].grad)
        assert ours < 1.5 * theirs + 1e-5, (t.name, ours, theirs, seed)


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama"])
def test_init_follows_the_tensor_table(rng, name):
    """lua: the original's uniform ranges; gpt2 and llama: normal(0.02) with
    the residual projections scaled by 1/sqrt(2 * layers), gains one, biases zero."""
    arch = arch_of(name, embed_dim=64, num_layers=4)
    model = GPT(arch)
    model.init_weights(rng)
    for t in model.params:
        kind, scale = t.spec.init
        if kind == "ones":
            assert (t.data == 1).all(), t.name
        elif kind == "zeros":
            assert (t.data == 0).all(), t.name
        elif kind == "uniform":
            assert np.abs(t.data).max() <= scale and np.abs(t.data).max() > 0.9 * scale, t.name
        else:
            assert abs(t.data.std() / scale - 1) < 0.1, t.name
    if name != "lua":
        proj = model.params["layers.0.proj"].spec.init[1]
        assert proj == pytest.approx(0.02 / np.sqrt(2 * arch.num_layers))


def test_eval_mode_is_deterministic_and_dropout_changes_training(rng):
    arch = preset("lua", n_vocab=32, embed_dim=16, num_heads=2, num_layers=1, seq_len=8)
    model = GPT(arch)
    model.init_weights(rng)
    ids = rng.integers(1, arch.n_vocab, (2, 8)).astype(np.int32)
    evals = [model.forward(ids, ids) for _ in range(2)]
    assert evals[0] == evals[1]
    trains = [model.forward(ids, ids, dropout=0.5, dropout_seed=s) for s in (1, 2)]
    assert trains[0] != trains[1] and evals[0] not in trains


@pytest.mark.parametrize("ids,message", [
    (np.array([[1, 2, 99]]), "out of range"),
    (np.array([[1, -1, 2]]), "out of range"),
    (np.zeros((1, 0)), "non-empty"),
    (np.zeros((0, 3)), "non-empty"),
    (np.array([1, 2, 3]), "non-empty"),
    (np.ones((1, 9)), "exceeds seq_len"),
])
def test_bad_token_ids_are_refused_before_the_kernel_runs(ids, message):
    arch = preset("lua", n_vocab=12, embed_dim=8, num_heads=2, num_layers=1, seq_len=8)
    model = GPT(arch)
    with pytest.raises(SqlgptError, match=message):
        model.forward(ids)
    good = np.ones((1, 4), np.int32)
    with pytest.raises(SqlgptError, match="out of range"):
        model.forward(good, targets=np.full((1, 4), 12))
    with pytest.raises(SqlgptError, match="out of range"):  # IGNORE (-1) only
        model.forward(good, targets=np.full((1, 4), -2))
    with pytest.raises(SqlgptError, match="do not match"):
        model.forward(good, targets=np.ones((1, 3), np.int32))


def test_backward_needs_a_forward_with_targets(rng):
    model = GPT(arch_of("gpt2"))
    with pytest.raises(SqlgptError, match="backward"):
        model.backward()
    model.forward(np.ones((1, 4), np.int32))
    with pytest.raises(SqlgptError, match="backward"):
        model.backward()


@pytest.mark.parametrize("overrides,message", [
    (dict(kv_heads=3), "kv_heads"),
    (dict(embed_dim=36, num_heads=12), "even head size"),
    (dict(num_heads=5), "must divide embed_dim"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(pos="alibi"), "pos must be one of"),
    (dict(mlp="geglu"), "mlp must be one of"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(ffn_dim=-1), "ffn_dim"),
])
def test_impossible_architectures_are_one_line_errors(overrides, message):
    with pytest.raises(SqlgptError, match=message):
        GPT(preset("llama", **{**SMALL, **overrides}))


# ---- external truth: transformers' own models ----
def transformers_logits(arch, model, ids):
    """transformers' float32 model with our weights: its own forward, as its
    users run it."""
    pytest.importorskip("transformers")
    from hf_reference import hf_model
    weights = {t.name: torch.tensor(t.data, dtype=torch.float64) for t in model.params}
    hf = hf_model(arch, weights).float()
    for module in hf.modules():  # drop the reference's float64 overrides
        module.__dict__.pop("forward", None)
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name,overrides", [
    ("gpt2", {}), ("gpt2", dict(tie_weights=False)), ("llama", dict(kv_heads=2)),
    ("llama", dict(kv_heads=1, tie_weights=True)), ("llama", dict(kv_heads=2, bias=True)),
], ids=["gpt2", "gpt2-untied", "llama-gqa", "llama-mqa-tied", "llama-bias"])
def test_logits_equal_transformers(rng, name, overrides):
    arch = preset(name, **{**SMALL, "seq_len": 64, **overrides})
    model = GPT(arch)
    model.init_weights(rng)
    for t in model.params:  # off the init's exact ones and zeros
        t.data += (0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    ids = rng.integers(0, arch.n_vocab, (2, arch.seq_len)).astype(np.int32)
    model.forward(ids)
    ours = model.acts.logits.reshape(2, arch.seq_len, -1)
    theirs = transformers_logits(arch, model, ids)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
