"""LoRA adapters: the kernel's forward and backward through them against the
PyTorch reference with PEFT's formula (y = x W + b + scale B(A(drop(x)))),
for every architecture; the frozen base; merging."""
import numpy as np
import pytest
import torch

from sqlgpt._kernel import lib
from sqlgpt.errors import SqlgptError
from sqlgpt.model.lora import SITES, LoraConfig, adaptable, base_path, lora_seeds, merged
from sqlgpt.model.model import GPT
from sqlgpt.model.tensor import fptr

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


# ---- the finetune command, its database, resuming, merging ----
import hashlib  # noqa: E402
import sqlite3  # noqa: E402

from click.testing import CliRunner  # noqa: E402

import sqlgpt  # noqa: E402
from sqlgpt.cli import main  # noqa: E402

from conftest import CORPUS  # noqa: E402
from helpers import weights_bytes  # noqa: E402

BASE = ["--tokenizer", "char", "--embed-dim", "64", "--heads", "4", "--layers", "2",
        "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3"]
TUNE = ["--batch-size", "8", "--lr", "1e-2", "--save-every", "5"]
# a second corpus unlike the first, in characters the base's tokenizer has
SECOND = "".join(f"the {w} is {c} and the {c} is {w}.\n" for w in
                 ("cat", "dog", "bird", "fish", "horse") for c in ("red", "blue", "green"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    (d / "first.txt").write_text(CORPUS.read_text()[:30000])
    (d / "second.txt").write_text(SECOND * 40)
    (d / "second_held_out.txt").write_text(SECOND * 4)
    return d


@pytest.fixture(scope="module", params=["lua", "gpt2", "llama"])
def base(request, corpora):
    db = corpora / f"base-{request.param}.db"
    result = run("train", corpora / "first.txt", "--db", db, "--preset", request.param,
                 "--iters", "150", "--save-every", "150", *BASE)
    assert result.exit_code == 0, result.output
    return db


def test_finetune_changes_only_adapter_rows_and_never_the_base(base, corpora, tmp_path):
    before = file_hash(base)
    tuned = tmp_path / "tuned.db"
    result = run("finetune", "--base", base, corpora / "second.txt", "--db", tuned,
                 "--iters", "10", "--lora-targets", "q,v,fc2", "--lora-rank", "4", *TUNE)
    assert result.exit_code == 0, result.output
    assert file_hash(base) == before
    rows = weights_bytes(tuned)
    assert {r[0] for r in rows} == {"layers"}  # no embeddings, head or norms of its own
    assert {r[2] for r in rows} == {f"{s}.lora_{p}" for s in ("q", "v", "fc2") for p in "ab"}
    assert any(r[4] != bytes(len(r[4])) for r in rows)  # Adam moments are stored
    m = sqlgpt.load(tuned)
    assert (m.lora.rank, m.lora.targets) == (4, "q,v,fc2")
    assert base_path(m.lora, tuned) == base.resolve()
    result = run("info", "--db", tuned)
    assert result.exit_code == 0 and "LoRA fine-tune of" in result.output
    assert "rank 4, alpha 16, targets q,v,fc2" in result.output
    assert m.num_parameters() == sqlgpt.load(base).num_parameters()


def test_a_finetune_lowers_the_second_corpus_loss_and_every_reader_takes_it(base, corpora,
                                                                           tmp_path):
    tuned = tmp_path / "tuned.db"
    result = run("finetune", "--base", base, corpora / "second.txt", "--db", tuned,
                 "--iters", "80", "--lora-targets", "q,k,v,proj,fc1,fc2", *TUNE)
    assert result.exit_code == 0, result.output
    held_out = corpora / "second_held_out.txt"
    base_loss = sqlgpt.load(base).evaluate(held_out.read_text()).loss
    tuned_loss = sqlgpt.load(tuned).evaluate(held_out.read_text()).loss
    assert tuned_loss < 0.65 * base_loss, (base_loss, tuned_loss)
    result = run("eval", held_out, "--db", tuned)
    assert result.exit_code == 0 and f"loss {tuned_loss:.4f}" in result.output
    result = run("generate", "--db", tuned, "--prompt", "the cat", "--max-tokens", "12",
                 "--seed", "3", "--no-stream")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == sqlgpt.load(tuned).generate(
        "the cat", max_tokens=12, seed=3)
    conn = sqlgpt.connect(tuned)
    assert "the cat" + conn.execute("SELECT sqlgpt_generate('the cat', 12, 1.0, 3)"
                                    ).fetchone()[0] == result.stdout.rstrip("\n")


def test_merge_writes_a_plain_model_with_the_adapters_logits(base, corpora, tmp_path):
    tuned, merged_db = tmp_path / "tuned.db", tmp_path / "merged.db"
    assert run("finetune", "--base", base, corpora / "second.txt", "--db", tuned,
               "--iters", "10", "--lora-targets", "k,proj,fc1", *TUNE).exit_code == 0
    result = run("merge", "--db", tuned, "-o", merged_db)
    assert result.exit_code == 0, result.output
    a, b = sqlgpt.load(tuned), sqlgpt.load(merged_db)
    assert b.lora is None
    ids = a.encode("the dog is blue")
    assert np.abs(a.logits(ids) - b.logits(ids)).max() < 1e-5
    assert a.generate("the", max_tokens=20, seed=1) == b.generate("the", max_tokens=20, seed=1)
    base_weights = sqlgpt.load(base).state_dict()
    names = {r[0] for r in sqlite3.connect(merged_db).execute("SELECT name FROM tensors")}
    assert names == set(base_weights)  # the merged matrices, not the adapters
    changed = [n for n, w in b.state_dict().items() if not np.array_equal(w, base_weights[n])]
    assert changed and all(n.rsplit(".", 1)[1] in ("k", "proj", "fc1") for n in changed)
    assert run("merge", "--db", base, "-o", tmp_path / "x.db").exit_code == 1


def test_a_finetune_resumes_exactly(corpora, tmp_path):
    base = tmp_path / "base.db"
    assert run("train", corpora / "first.txt", "--db", base, "--iters", "10",
               *BASE).exit_code == 0
    straight, resumed = tmp_path / "straight.db", tmp_path / "resumed.db"
    common = ["--base", base, corpora / "second.txt", "--lora-dropout", "0.2", *TUNE]
    assert run("finetune", *common, "--db", straight, "--iters", "10").exit_code == 0
    assert run("finetune", *common, "--db", resumed, "--iters", "5").exit_code == 0
    result = run("finetune", "--db", resumed, "--resume", "--iters", "10")
    assert result.exit_code == 0, result.output
    assert weights_bytes(straight) == weights_bytes(resumed)
    result = run("finetune", "--db", resumed, "--resume", "--iters", "20", "--lora-rank", "3")
    assert result.exit_code == 1 and "--lora-rank 3 (stored: 8)" in result.output


def test_a_missing_changed_or_foreign_base_is_a_one_line_error(corpora, tmp_path):
    base = tmp_path / "base.db"
    assert run("train", corpora / "first.txt", "--db", base, "--iters", "10",
               *BASE).exit_code == 0
    tuned = tmp_path / "tuned.db"
    assert run("finetune", "--base", base, corpora / "second.txt", "--db", tuned,
               "--iters", "5", *TUNE).exit_code == 0
    assert run("train", "--db", base, "--resume", "--iters", "12").exit_code == 0
    result = run("generate", "--db", tuned, "--max-tokens", "3")
    assert result.exit_code == 1 and "has changed since" in result.output
    assert len(result.output.strip().splitlines()) == 1
    base.unlink()
    result = run("eval", corpora / "second.txt", "--db", tuned)
    assert result.exit_code == 1 and "is missing" in result.output
    assert run("train", corpora / "first.txt", "--db", base, "--iters", "2", *BASE,
               "--embed-dim", "48").exit_code == 0
    result = run("finetune", "--db", tuned, "--resume", "--iters", "8")
    assert result.exit_code == 1 and "architecture" in result.output


@pytest.mark.parametrize("options, message", [
    (["--lora-rank", "0"], "--lora-rank must be an integer from 1"),
    (["--lora-rank", "65"], "width 64"),
    (["--lora-targets", "q,attn"], "unknown --lora-targets attn"),
    (["--lora-alpha", "-1"], "--lora-alpha must be a number above 0"),
])
def test_impossible_finetunes_write_nothing(corpora, tmp_path, options, message):
    base = tmp_path / "base.db"
    assert run("train", corpora / "first.txt", "--db", base, "--iters", "2",
               *BASE).exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("finetune", "--base", base, corpora / "second.txt", "--db",
                 tmp_path / "tuned.db", *options)
    assert result.exit_code == 1 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_finetune_needs_a_plain_base(corpora, tmp_path):
    base, tuned = tmp_path / "base.db", tmp_path / "tuned.db"
    assert run("train", corpora / "first.txt", "--db", base, "--iters", "2",
               *BASE).exit_code == 0
    result = run("finetune", corpora / "second.txt", "--db", tuned)
    assert result.exit_code == 1 and "--base" in result.output
    assert run("finetune", "--base", base, corpora / "second.txt", "--db", tuned,
               "--iters", "2", *TUNE).exit_code == 0
    result = run("finetune", "--base", tuned, corpora / "second.txt", "--db",
                 tmp_path / "again.db")
    assert result.exit_code == 1 and "itself a LoRA fine-tune" in result.output
    result = run("train", corpora / "second.txt", "--db", tmp_path / "x.db", "--lora-alpha", "4")
    assert result.exit_code == 1 and "needs --lora-rank" in result.output
