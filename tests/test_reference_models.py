"""The PyTorch reference (tests/torch_reference.py) against transformers'
GPT-2 and llama given the same weights through arch.py's hf names: both the
reference's rules and the name map, without sqlgpt's kernel."""
import pytest
import torch

from sqlgpt.model.arch import preset

from torch_reference import reference_logits, random_weights

pytest.importorskip("transformers")
from hf_reference import hf_model  # noqa: E402 (needs transformers)

SMALL = dict(n_vocab=50, embed_dim=32, num_heads=4, num_layers=2, seq_len=16)
B = 3


@pytest.mark.parametrize("name,overrides", [
    ("gpt2", {}),
    ("gpt2", dict(tie_weights=False)),
    ("llama", dict(kv_heads=2)),
    ("llama", dict(kv_heads=2, tie_weights=True)),
    ("llama", dict(kv_heads=1, bias=True)),
], ids=["gpt2", "gpt2-untied", "llama-gqa", "llama-tied", "llama-bias"])
def test_reference_logits_equal_transformers(rng, name, overrides):
    arch = preset(name, **SMALL, **overrides)
    weights = random_weights(arch, rng)
    ids = torch.tensor(rng.integers(0, arch.n_vocab, (B, arch.seq_len)))
    with torch.no_grad():
        theirs = hf_model(arch, weights)(ids).logits
        ours = reference_logits(weights, arch, ids)
    assert theirs.dtype == ours.dtype == torch.float64
    assert (ours - theirs).abs().max() < 1e-9


def test_the_float64_norm_and_rotary_change_only_precision(rng):
    """hf_model swaps llama's float32 RMSNorm and rotary angles for float64
    ones; transformers' own (restored by dropping the instance overrides)
    must agree to float32's accuracy."""
    arch = preset("llama", **SMALL, kv_heads=2)
    weights = random_weights(arch, rng)
    ids = torch.tensor(rng.integers(0, arch.n_vocab, (B, arch.seq_len)))
    model = hf_model(arch, weights)
    with torch.no_grad():
        exact = model(ids).logits
        for module in model.modules():
            module.__dict__.pop("forward", None)
        own = model(ids).logits
    assert 0 < (exact - own).abs().max() < 1e-5


def test_an_architecture_transformers_cannot_express_is_refused(rng):
    arch = preset("gpt2", **SMALL, mlp="relu")
    with pytest.raises(ValueError, match="mlp"):
        hf_model(arch, random_weights(arch, rng))
