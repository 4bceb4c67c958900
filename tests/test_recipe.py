"""The training recipe: optimizers and their weight-decay groups, schedules,
gradient accumulation, the gradient norm per step, and resuming with the
settings a model was created with."""
import math
import sqlite3

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sqlgpt
from sqlgpt.model.arch import preset
from sqlgpt.model.config import TrainConfig
from sqlgpt.model.model import GPT

from conftest import TINY
from helpers import rel_err


def run(*args):
    return CliRunner().invoke(main_cli(), [str(a) for a in args])


def main_cli():
    from sqlgpt.cli import main
    return main


def nanogpt_lr(it, lr, min_lr, warmup, decay_iters, schedule):
    """nanoGPT's get_lr for the step numbered it from 1 (warm-up to lr, then
    the decay to min_lr at decay_iters, min_lr after)."""
    if it <= warmup:
        return lr * it / (warmup + 1)
    if schedule == "constant":
        return lr
    ratio = min(1.0, (it - warmup) / (decay_iters - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedules(schedule, warmup):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=warmup, lr_decay_iters=100,
                      lr_schedule=schedule, max_iters=500)
    for step in range(1, 200):
        assert cfg.lr_at(step) == pytest.approx(
            nanogpt_lr(step, 1e-3, 1e-4, warmup, 100, schedule), rel=1e-12), step


def test_a_resumed_cosine_run_keeps_its_curve(tmp_path, small_corpus):
    """The decay length is fixed when the model is created: resuming to more
    steps continues at min_lr instead of stretching the curve already taken."""
    def lrs(db):
        return [r[0] for r in sqlite3.connect(db).execute("SELECT lr FROM metrics ORDER BY step")]
    common = [*TINY, "--lr-schedule", "cosine", "--lr", "1e-3", "--min-lr", "2e-4",
              "--warmup", "2", "--save-every", "3"]
    once, twice = tmp_path / "once.db", tmp_path / "twice.db"
    assert run("train", small_corpus, "--db", once, "--iters", 12, *common,
               "--lr-decay-iters", 6).exit_code == 0
    assert run("train", small_corpus, "--db", twice, "--iters", 6, *common).exit_code == 0
    result = run("train", small_corpus, "--db", twice, "--iters", 12, "--resume")
    assert result.exit_code == 0, result.output
    assert lrs(twice) == lrs(once)
    assert lrs(once)[6:] == [pytest.approx(2e-4)] * 6
    assert sqlgpt.load(twice).state_dict()["head"].tolist() == \
        sqlgpt.load(once).state_dict()["head"].tolist()


def test_grad_accum_equals_one_larger_batch(tmp_path, small_corpus):
    dbs = {}
    for name, batch, accum in (("one", 8, 1), ("accum", 4, 2), ("four", 2, 4)):
        dbs[name] = tmp_path / f"{name}.db"
        result = run("train", small_corpus, "--db", dbs[name], "--iters", 3, *TINY,
                     "--batch-size", batch, "--grad-accum", accum, "--dropout", 0)
        assert result.exit_code == 0, result.output
    ref = sqlgpt.load(dbs["one"]).state_dict()
    for name in ("accum", "four"):
        weights = sqlgpt.load(dbs[name]).state_dict()
        for tensor in ref:
            assert rel_err(weights[tensor], ref[tensor]) < 1e-5, (name, tensor)


def test_the_gradient_norm_of_every_step_is_stored(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 4, *TINY,
               "--grad-clip", "0.5").exit_code == 0
    norms = [r[0] for r in sqlite3.connect(db).execute("SELECT grad_norm FROM metrics")]
    assert len(norms) == 4 and all(n > 0.5 for n in norms)  # before clipping


def model_and_grads(rng):
    arch = preset("gpt2", n_vocab=40, embed_dim=32, num_heads=4, num_layers=2, seq_len=8)
    model = GPT(arch)
    model.init_weights(rng)
    grads = [{t.name: rng.standard_normal(t.shape).astype(np.float32) for t in model.params}
             for _ in range(3)]
    return model, grads


@pytest.mark.parametrize("name,kw", [
    ("adamw", dict(weight_decay=0.1, beta2=0.99)), ("adam", dict(weight_decay=0.1)),
    ("sgd", dict(momentum=0.9, weight_decay=0.01))])
def test_optimizer_groups_match_torch(rng, name, kw):
    """Matrices and embeddings decay, norm gains and biases do not: two
    torch.optim groups given the same gradients, step by step."""
    model, grads = model_and_grads(rng)
    params = {t.name: torch.nn.Parameter(torch.tensor(t.data, dtype=torch.float64))
              for t in model.params}
    decay = [params[t.name] for t in model.params if t.spec.decay]
    plain = [params[t.name] for t in model.params if not t.spec.decay]
    assert decay and plain
    wd = kw.get("weight_decay", 0.0)
    groups = [{"params": decay, "weight_decay": wd}, {"params": plain, "weight_decay": 0.0}]
    lr = 1e-2
    opt = {"adamw": lambda: torch.optim.AdamW(groups, lr, betas=(0.9, kw.get("beta2", 0.999))),
           "adam": lambda: torch.optim.Adam(groups, lr),
           "sgd": lambda: torch.optim.SGD(groups, lr, momentum=kw["momentum"])}[name]()
    for step, grad in enumerate(grads, 1):
        for t in model.params:
            t.grad[...] = grad[t.name]
            params[t.name].grad = torch.tensor(grad[t.name], dtype=torch.float64)
        model.optimizer_step(step, lr, name, beta2=kw.get("beta2", 0.999), weight_decay=wd,
                             momentum=kw.get("momentum", 0.0))
        opt.step()
    for t in model.params:
        assert rel_err(t.data, params[t.name].detach()) < 1e-5, t.name


def test_grad_clip_matches_torch(rng):
    model, grads = model_and_grads(rng)
    for t in model.params:
        t.grad[...] = grad = grads[0][t.name]
    tensors = [torch.tensor(grads[0][t.name], dtype=torch.float64, requires_grad=True)
               for t in model.params]
    for tensor in tensors:
        tensor.grad = tensor.detach().clone()
    total = torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    norm = math.sqrt(model.grad_norm_squared())
    assert norm == pytest.approx(total.item(), rel=1e-6)
    model.params.scale_grad(1.0 / norm)  # what training does above the limit
    for t, tensor in zip(model.params, tensors):
        assert rel_err(t.grad, tensor.grad) < 1e-6
    del grad


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_every_optimizer_trains(tmp_path, small_corpus, optimizer):
    db = tmp_path / "m.db"
    lr = "0.05" if optimizer == "sgd" else "3e-3"
    result = run("train", small_corpus, "--db", db, "--iters", 30, *TINY, "--optimizer",
                 optimizer, "--lr", lr, "--momentum", "0.9" if optimizer == "sgd" else "0",
                 "--weight-decay", "0.01", "--save-every", "30")
    assert result.exit_code == 0, result.output
    losses = [r[0] for r in sqlite3.connect(db).execute("SELECT loss FROM metrics ORDER BY step")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert sqlgpt.load(db).config["optimizer"] == optimizer


def test_resume_accepts_the_stored_settings_and_names_the_others(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    args = ["train", small_corpus, "--db", db, *TINY, "--lr", "1e-3"]
    assert run(*args, "--iters", 2).exit_code == 0
    result = run(*args, "--iters", 4, "--resume")  # the same command again, resumed
    assert result.exit_code == 0, result.output
    result = run("train", small_corpus, "--db", db, "--iters", 6, "--resume", "--lr", "2e-3",
                 "--heads", "2", "--embed-dim", "32")
    assert result.exit_code != 0
    # how it learns may change on resume; what the model is may not
    assert "--heads 2 (stored: 4)" in result.output and "--init-from" in result.output
    assert "--embed-dim" not in result.output and "--lr" not in result.output


def test_resume_with_nothing_to_do_says_one_true_thing(tmp_path, small_corpus):
    import json
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 2, *TINY).exit_code == 0
    before = db.read_bytes()
    result = run("train", "--db", db, "--iters", 2, "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert "already trained to step 2" in result.output and "nan" not in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps_run"] == 0 and summary["final_loss"] > 0 and summary["step"] == 2
    assert db.read_bytes() == before


def test_bad_run_lengths_are_usage_errors_and_a_directory_is_not_a_database(tmp_path,
                                                                            small_corpus):
    result = run("train", small_corpus, "--db", tmp_path / "m.db", "--iters", 0, *TINY)
    assert result.exit_code == 2 and "--iters" in result.output
    result = run("train", small_corpus, "--db", tmp_path, "--iters", 1, *TINY)
    assert result.exit_code == 1 and "is a directory" in result.output


def test_a_run_file_holds_options_and_flags_override_it(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    settings = dict(zip([o.lstrip("-") for o in TINY[::2]], TINY[1::2]))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("\n".join([f"corpus: [{small_corpus}]", f"db: {db}", "preset: llama",
                                    "tokenizer: char", "kv_heads: 2", "iters: 3",
                                    "lr-schedule: cosine", "lr: 0.002"]
                                   + [f"{k}: {v}" for k, v in settings.items()]))
    result = run("train", "--config", yaml_file, "--lr", "0.001")
    assert result.exit_code == 0, result.output
    stored = sqlgpt.load(db).config
    assert stored["kv_heads"] == 2 and stored["lr_schedule"] == "cosine"
    assert stored["lr"] == 0.001 and stored["tokenizer"] == "char"  # the flag won
    result = run("train", "--config", yaml_file, "--lr", "0.001", "--iters", 5, "--resume")
    assert result.exit_code == 0, result.output  # the file's settings equal the stored ones
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(f'db = "{tmp_path / "t.db"}"\ncorpus = ["{small_corpus}"]\n'
                         + "".join(f'{k} = {v}\n' for k, v in settings.items()) + "iters = 2\n")
    assert run("train", "--config", toml_file).exit_code == 0


@pytest.mark.parametrize("content,suffix,message", [
    ("bogus: 1", ".yaml", "unknown option(s): bogus"), ("[oops", ".toml", "malformed"),
    ("- a list", ".yaml", "mapping"), ("x", ".ini", "must end in")])
def test_bad_run_files_are_usage_errors(tmp_path, small_corpus, content, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(content)
    result = run("train", small_corpus, "--db", tmp_path / "m.db", "--config", path)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.db").exists()


def test_init_from_a_trained_model(tmp_path, small_corpus):
    base = tmp_path / "base.db"
    assert run("train", small_corpus, "--db", base, "--iters", 4, *TINY, "--tokenizer",
               "char").exit_code == 0
    before = base.read_bytes()
    other = tmp_path / "new.txt"
    other.write_text(small_corpus.read_text()[::-1])
    tuned = tmp_path / "tuned.db"
    result = run("train", other, "--db", tuned, "--init-from", base, "--iters", 2,
                 "--batch-size", 4, "--lr", "1e-5")
    assert result.exit_code == 0, result.output
    assert base.read_bytes() == before
    a, b = sqlgpt.load(base), sqlgpt.load(tuned)
    assert a.arch == b.arch and b.config["tokenizer"] == "char" and b.step == 2
    for name, array in a.state_dict().items():
        assert rel_err(b.state_dict()[name], array) < 1e-2
    result = run("train", other, "--db", tmp_path / "x.db", "--init-from", base,
                 "--embed-dim", 64)
    assert result.exit_code != 0 and "--embed-dim 64 (stored: 32)" in result.output


def test_threads_option(tmp_path, small_corpus):
    from sqlgpt._kernel import lib
    try:
        result = run("train", small_corpus, "--db", tmp_path / "m.db", "--iters", 1, *TINY,
                     "--threads", 1)
        assert result.exit_code == 0, result.output
        assert lib.max_threads() == 1
    finally:
        sqlgpt.set_threads("auto")  # CliRunner runs in this process: the other tests keep theirs
    assert run("train", small_corpus, "--db", tmp_path / "n.db", "--threads", 0).exit_code == 2


def test_resume_compares_what_settings_mean(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--iters", 1, *TINY).exit_code == 0
    # kv heads and the MLP width default to the heads and 4 x width: saying so is no change
    result = run("train", small_corpus, "--db", db, "--iters", 2, "--resume", "--kv-heads", 4,
                 "--ffn-dim", 128)
    assert result.exit_code == 0, result.output
    result = run("train", small_corpus, "--db", db, "--iters", 3, "--resume", "--kv-heads", 2)
    assert result.exit_code != 0 and "--kv-heads 2" in result.output


def test_init_from_refuses_its_own_file_and_a_changed_tokenizer(tmp_path, small_corpus):
    base = tmp_path / "base.db"
    assert run("train", small_corpus, "--db", base, "--iters", 1, *TINY).exit_code == 0
    before = base.read_bytes()
    result = run("train", small_corpus, "--db", base, "--init-from", base, "--overwrite")
    assert result.exit_code != 0 and "same file" in result.output
    result = run("train", small_corpus, "--db", tmp_path / "t.db", "--init-from", base,
                 "--tokenizer", "char")
    assert result.exit_code != 0 and "--tokenizer char (stored: word)" in result.output
    assert base.read_bytes() == before


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama"])
def test_checkpointed_activations_give_the_same_gradients_bit_for_bit(rng, name):
    arch = preset(name, n_vocab=50, embed_dim=32, num_heads=4, num_layers=3, seq_len=16,
                  **({"kv_heads": 2} if name == "llama" else {}))
    x = rng.integers(1, 50, (3, 16))
    init_seed, dropout_seed = int(rng.integers(2**31)), int(rng.integers(2**31))
    results = []
    for checkpointed in (False, True):
        model = GPT(arch, checkpoint_activations=checkpointed)
        model.init_weights(np.random.default_rng(init_seed))
        model.params.zero_grad()
        loss = model.forward(x, np.roll(x, -1, 1), dropout=0.1, dropout_seed=dropout_seed)
        model.backward()
        results.append((loss, model.params.arenas["grad"].copy(),
                        sum(b.nbytes for b in {id(a): a for layer in model.acts.layers
                                               for a in layer.values()}.values())))
    (loss, grads, kept), (loss_ck, grads_ck, kept_ck) = results
    assert loss == loss_ck and np.array_equal(grads, grads_ck)
    assert kept_ck < kept / 2  # three layers' buffers became one block's and three inputs


def test_checkpoint_activations_train_the_same_model_and_may_change_on_resume(tmp_path,
                                                                              small_corpus):
    plain, checkpointed = tmp_path / "plain.db", tmp_path / "ck.db"
    assert run("train", small_corpus, "--db", plain, "--iters", 6, *TINY).exit_code == 0
    assert run("train", small_corpus, "--db", checkpointed, "--iters", 3, *TINY,
               "--checkpoint-activations").exit_code == 0
    result = run("train", small_corpus, "--db", checkpointed, "--iters", 6, "--resume",
                 "--no-checkpoint-activations")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(checkpointed).train_config.checkpoint_activations is False
    ref, got = sqlgpt.load(plain).state_dict(), sqlgpt.load(checkpointed).state_dict()
    assert all(np.array_equal(ref[name], got[name]) for name in ref)


def test_dropout_anneals_linearly_over_the_decay_length():
    cfg = TrainConfig(dropout=0.2, dropout_final=0.0, lr_decay_iters=100, max_iters=300)
    assert [cfg.dropout_at(s) for s in (0, 50, 100, 250)] == \
        [pytest.approx(v) for v in (0.2, 0.1, 0.0, 0.0)]
    assert TrainConfig(dropout=0.2).dropout_at(70) == 0.2  # no annealing by default


def test_dropout_final_changes_training_and_is_stored(tmp_path, small_corpus):
    dbs = {}
    for name, extra in (("fixed", []), ("annealed", ["--dropout-final", "0"])):
        dbs[name] = tmp_path / f"{name}.db"
        result = run("train", small_corpus, "--db", dbs[name], "--iters", 4, *TINY,
                     "--dropout", "0.3", *extra)
        assert result.exit_code == 0, result.output
    assert sqlgpt.load(dbs["annealed"]).train_config.dropout_final == 0.0
    assert sqlgpt.load(dbs["fixed"]).state_dict()["head"].tolist() != \
        sqlgpt.load(dbs["annealed"]).state_dict()["head"].tolist()
    assert run("train", small_corpus, "--db", tmp_path / "bad.db", *TINY,
               "--dropout-final", "1.5").exit_code != 0


def test_a_val_file_is_held_out_whole(tmp_path, small_corpus):
    text = small_corpus.read_text()
    train_text, val_text = tmp_path / "train.txt", tmp_path / "val.txt"
    train_text.write_text(text[:15000])
    val_text.write_text(text[15000:])
    db = tmp_path / "m.db"
    result = run("train", train_text, "--db", db, "--iters", 4, "--save-every", 2, *TINY,
                 "--tokenizer", "char", "--vocab-size", 0, "--val-file", val_text,
                 "--eval-iters", 0)
    assert result.exit_code == 0, result.output
    cfg = sqlgpt.load(db).train_config
    assert cfg.val_fraction == 0.0 and cfg.val_file == str(val_text.resolve())
    stored = [r[0] for r in sqlite3.connect(db).execute("SELECT loss FROM evaluations "
                                                        "ORDER BY step")]
    # the stored evaluation is the val file scored by `sqlgpt eval` at stride seq_len
    scored = sqlgpt.load(db).evaluate(paths=[val_text], stride=16)
    assert len(stored) == 2 and stored[-1] == pytest.approx(scored.loss, rel=1e-5)
    # resuming finds the held-out tokens again (here: after their file is gone)
    (tmp_path / "m.db.val.tokens").unlink()
    result = run("train", train_text, "--db", db, "--iters", 6, "--resume", "--val-file",
                 val_text)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.db.val.tokens").is_file()
    assert run("train", train_text, "--db", tmp_path / "x.db", *TINY, "--val-file",
               val_text, "--val-fraction", "0.2").exit_code == 2
    short = tmp_path / "short.txt"
    short.write_text("too short")
    result = run("train", train_text, "--db", tmp_path / "y.db", *TINY, "--val-file", short)
    assert result.exit_code == 1 and "too few" in result.output
    assert not (tmp_path / "y.db").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".y.db", "y.db"))]
    result = run("train", train_text, "--db", tmp_path / "z.db", *TINY, "--val-file",
                 tmp_path / "missing.txt")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_a_diverging_run_warns_and_stops_on_request(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 30, *TINY, "--lr", "10")
    assert result.exit_code == 0 and "warning: the loss is diverging" in result.output
    stopped = tmp_path / "stopped.db"
    result = run("train", small_corpus, "--db", stopped, "--iters", 30, "--save-every", 5,
                 *TINY, "--lr", "10", "--stop-on-divergence")
    assert result.exit_code == 1 and "the loss diverged" in result.output
    assert result.output.splitlines()[-1].startswith("Error: stopped at step 10")
    model = sqlgpt.load(stopped)
    assert model.step < 30 and np.isfinite(model.state_dict()["head"]).all()
    calm = tmp_path / "calm.db"
    result = run("train", small_corpus, "--db", calm, "--iters", 30, *TINY, "--lr", "1e-3",
                 "--stop-on-divergence")
    assert result.exit_code == 0 and "warning" not in result.output
