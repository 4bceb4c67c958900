"""Classifiers: the head's forward and backward against PyTorch, training
from SQL, CSV and JSON Lines to high accuracy, the stored labels and scores,
and classifying from the API, the CLI and SQL."""
import numpy as np
import pytest
import torch

from sqlgpt.errors import SqlgptError
from sqlgpt.model.model import GPT

from architectures import arch_of
from torch_reference import random_weights, reference_classify_loss


def classifier_case(rng, name, pool, labels=3, B=4, lora=None):
    """(model, ids, lens, labels, reference weights) of a random classifier."""
    arch = arch_of(name, num_labels=labels, pool=pool)
    weights = random_weights(arch, rng)
    model = GPT(arch)
    for t in model.params:
        t.data[...] = weights[t.name].numpy()
    T = arch.seq_len
    ids = rng.integers(0, arch.n_vocab, (B, T)).astype(np.int32)
    lens = np.array([T, 1, T // 2, 3][:B], dtype=np.int32)
    for b, n in enumerate(lens):
        ids[b, n:] = 0  # padding: must not change the result
    targets = rng.integers(0, labels, B).astype(np.int32)
    return model, ids, lens, targets


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("name", ["lua", "gpt2", "llama", "llama-mqa-tied-bias"])
def test_classifier_loss_and_every_gradient_match_pytorch(rng, name, pool):
    model, ids, lens, labels = classifier_case(rng, name, pool)
    labels[2] = -1  # skipped, as the language model's IGNORE
    model.params.zero_grad()
    loss = model.classify_forward(ids, lens, labels)
    logits = model.acts.logits.copy()
    model.classify_backward()
    ref_weights = {t.name: torch.tensor(t.data, dtype=torch.float64, requires_grad=True)
                   for t in model.params}
    relu = [L["h"] for L in model.acts.layers] if model.arch.mlp == "relu" else None
    ref, ref_logits = reference_classify_loss(
        ref_weights, model.arch, torch.tensor(ids, dtype=torch.long), lens,
        torch.tensor(labels, dtype=torch.long), relu_signs=relu)
    ref.backward()
    assert abs(loss - ref.item()) / ref.item() < 1e-4
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    grads = {name: (w.grad.numpy() if w.grad is not None else np.zeros(w.shape))
             for name, w in ref_weights.items()}  # the language model's head: unused, 0
    total = np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    for t in model.params:
        expected = grads[t.name]
        err = np.linalg.norm(t.grad - expected) / max(np.linalg.norm(expected), 1e-3 * total)
        assert err < 1e-4, (t.name, err)
    # the padding positions get no gradient through the pooling
    assert model.params["cls_w"].grad.any() and model.params["cls_b"].grad.any()


def test_padding_changes_nothing(rng):
    model, ids, lens, labels = classifier_case(rng, "llama", "mean")
    model.classify_forward(ids, lens)
    first = model.acts.logits.copy()
    for b, n in enumerate(lens):
        ids[b, n:] = rng.integers(0, model.arch.n_vocab, ids.shape[1] - n)
    model.classify_forward(ids, lens)
    np.testing.assert_array_equal(model.acts.logits, first)


@pytest.mark.parametrize("call, message", [
    (lambda m, ids, lens: m.classify_forward(ids, lens * 0), "a length from 1"),
    (lambda m, ids, lens: m.classify_forward(ids, lens, [0, 1, 2, 3]), r"ids in \[0, 3\)"),
    (lambda m, ids, lens: m.classify_backward(), "needs a classify_forward"),
])
def test_bad_classifier_calls_are_one_line_errors(rng, call, message):
    model, ids, lens, _ = classifier_case(rng, "gpt2", "last")
    with pytest.raises(SqlgptError, match=message):
        call(model, ids, lens)


def test_a_language_model_has_no_classifier(rng):
    model = GPT(arch_of("gpt2"))
    with pytest.raises(SqlgptError, match="no classification head"):
        model.classify_forward(np.zeros((1, 4), np.int32), [4])
