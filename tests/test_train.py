"""Training: it learns, resumes exactly, and refuses to clobber a database."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main
from sqlgpt.data.dataset import split_tokens

from helpers import weights_bytes
from conftest import CORPUS, TINY


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])




def test_training_learns_well_below_the_unigram_entropy(tmp_path):
    """On Tiny Shakespeare the held-out loss ends well below the cross-entropy
    of a unigram model fitted to the training split."""
    db = tmp_path / "m.db"
    result = run("train", CORPUS, "--db", db, "--iters", 400, "--embed-dim", 64, "--heads", 4,
                 "--layers", 2, "--seq-len", 64, "--batch-size", 16, "--lr", 1e-3,
                 "--dropout", 0.0, "--save-every", 400, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 400 and summary["tokens_per_sec"] > 0
    model = sqlgpt.load(db)
    tokens = model.encode(CORPUS.read_text())
    train, val = split_tokens(tokens, 64)
    counts = np.bincount(train, minlength=model.config["vocab_size"] + 2) + 1e-9
    unigram = -np.mean(np.log(counts[val] / counts.sum()))
    conn = store.open_database(db)
    val_loss = conn.execute("SELECT val_loss FROM checkpoints WHERE step = 400").fetchone()[0]
    conn.close()
    assert val_loss < unigram - 0.3, (val_loss, unigram)


@pytest.mark.parametrize("dropout", ["0.0", "0.2"])
def test_resume_equals_one_uninterrupted_run(tmp_path, small_corpus, dropout):
    straight, split = tmp_path / "straight.db", tmp_path / "split.db"
    common = [*TINY, "--dropout", dropout, "--save-every", "7"]
    assert run("train", small_corpus, "--db", straight, "--iters", 20, *common).exit_code == 0
    assert run("train", small_corpus, "--db", split, "--iters", 6, *common).exit_code == 0
    for stop in (13, 20):
        result = run("train", small_corpus, "--db", split, "--iters", stop, "--save-every", 7,
                     "--resume")
        assert result.exit_code == 0, result.output
    assert weights_bytes(straight) == weights_bytes(split)
    losses = []
    for db in (straight, split):
        conn = store.open_database(db)
        losses.append(conn.execute("SELECT step, loss FROM metrics ORDER BY step").fetchall())
        conn.close()
    assert losses[0] == losses[1] and len(losses[0]) == 20


def test_existing_database_needs_resume_or_overwrite(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    before = db.read_bytes()
    result = run("train", small_corpus, "--db", db, "--iters", 5, *TINY)
    assert result.exit_code != 0 and "--resume" in result.output and "--overwrite" in result.output
    assert db.read_bytes() == before
    result = run("train", small_corpus, "--db", db, "--iters", 5, *TINY, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(db).step == 5


def test_resume_without_its_token_file_says_to_name_the_corpus_again(tmp_path, trained_db,
                                                                    small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    result = run("train", "--db", db, "--iters", 34, "--resume")
    assert result.exit_code == 1 and "name the corpus again" in result.output, result.output
    assert "--overwrite" not in result.output
    result = run("train", small_corpus, "--db", db, "--iters", 34, "--resume")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(db).step == 34


def test_resume_refuses_changed_model_options_and_another_corpus(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    before = db.read_bytes()
    result = run("train", small_corpus, "--db", db, "--iters", 40, "--resume", "--embed-dim", 64)
    assert result.exit_code != 0 and "--embed-dim" in result.output
    other = tmp_path / "other.txt"
    other.write_text("completely different words " * 100)
    result = run("train", other, "--db", db, "--iters", 40, "--resume")
    assert result.exit_code != 0 and "same file" in result.output
    assert db.read_bytes() == before


def test_nan_loss_never_reaches_a_checkpoint(tmp_path, small_corpus):
    """Steps with a NaN loss are skipped and counted (no update), then
    training stops; the weights on disk stay the last good ones."""
    from sqlgpt.errors import SqlgptError
    from sqlgpt.model.arch import preset
    from sqlgpt.model.config import TrainConfig
    from sqlgpt.train.trainer import Trainer
    db = tmp_path / "m.db"
    arch = preset("lua", embed_dim=32, num_heads=4, num_layers=2, seq_len=16)
    cfg = TrainConfig(vocab_size=100, batch_size=4, max_iters=10)
    trainer = Trainer.create(db, [small_corpus], arch, cfg)
    trainer.run(3, save_every=1)
    good = {k: v.copy() for k, v in sqlgpt.load(db).state_dict().items()}
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **k: forward(*a, **k) * float("nan")
    with pytest.raises(SqlgptError, match="NaN/Inf"):
        trainer.run(20, save_every=1, max_bad_steps=3)
    assert trainer.state["bad_steps"] == 4
    trainer.close()
    model = sqlgpt.load(db)  # skipped steps changed no weight
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(array, good[name])


def test_inf_weights_are_never_saved(tmp_path, small_corpus):
    from sqlgpt.errors import SqlgptError
    from sqlgpt.model.arch import preset
    from sqlgpt.model.config import TrainConfig
    from sqlgpt.train.trainer import Trainer
    db = tmp_path / "m.db"
    arch = preset("lua", embed_dim=32, num_heads=4, num_layers=2, seq_len=16)
    cfg = TrainConfig(vocab_size=100, batch_size=4)
    trainer = Trainer.create(db, [small_corpus], arch, cfg)
    trainer.model.params["layers.1.fc2"].data[0, 0] = np.inf  # not in the loss's path to NaN
    trainer.model.params["layers.1.fc2"].m[0, 0] = np.nan
    with pytest.raises(SqlgptError, match="NaN or Inf"):
        trainer.checkpoint([1.0])
    trainer.close()
    assert sqlgpt.load(db).step == 0


@pytest.mark.parametrize("args,message", [(["--lr", "1e30"], "lr"), (["--seed", "-1"], "seed"),
                                          (["--iters", str(2**40)], "iters"),
                                          (["--layers", "100000"], "num_layers")])
def test_out_of_range_options_are_one_line_errors(tmp_path, small_corpus, args, message):
    result = run("train", small_corpus, "--db", tmp_path / "m.db", *TINY, *args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.db").exists()


def test_small_corpus_with_fewer_words_than_vocab_size(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log " * 20)
    db = tmp_path / "m.db"
    result = run("train", corpus, "--db", db, "--iters", 3, "--embed-dim", 16, "--heads", 2,
                 "--layers", 1, "--seq-len", 8, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    model = sqlgpt.load(db)
    assert model.config["vocab_size"] == 8
    assert model.state_dict()["head"].shape == (16, 10)


def test_grad_clip_is_stored_and_limits_the_update(tmp_path, small_corpus):
    from sqlgpt.model.model import GPT
    clipped, free = tmp_path / "clipped.db", tmp_path / "free.db"
    for db, extra in ((clipped, ["--grad-clip", "1e-6"]), (free, [])):
        assert run("train", small_corpus, "--db", db, "--iters", 1, *TINY, "--dropout", 0,
                   *extra).exit_code == 0
    assert sqlgpt.load(clipped).config["grad_clip"] == 1e-6
    # Adam's first step moves every weight by about lr whatever the gradient's
    # scale, so compare the stored first moments: clipped ones are that much smaller
    conn = store.open_database(clipped)
    m_clipped = GPT(store.read_config(conn)[0])
    store.read_weights(conn, m_clipped)
    conn.close()
    conn = store.open_database(free)
    m_free = GPT(store.read_config(conn)[0])
    store.read_weights(conn, m_free)
    conn.close()
    norm = lambda m: float(np.linalg.norm(m.params.arenas["m"]))  # noqa: E731
    assert norm(m_clipped) < 1e-6 * 0.11 and norm(m_free) > 1e-3


def test_the_end_of_training_says_which_loss_is_which(tmp_path, small_corpus):
    from sqlgpt.cli.training import overfitting
    result = run("train", small_corpus, "--db", tmp_path / "m.db", "--iters", 20,
                 "--save-every", 10, *TINY)
    assert result.exit_code == 0, result.output
    assert "train loss" in result.output and "(mean since the last checkpoint)" in result.output
    assert "step 20: last step's loss" in result.output
    # memorizing: validation far above training (and never on unknown losses)
    assert overfitting(1.78, 6.23) and not overfitting(3.9, 4.1)
    assert not overfitting(None, 6.0) and not overfitting(float("nan"), 6.0)


def test_resume_may_change_how_it_learns_and_records_it(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    was = sqlgpt.load(db).train_config
    result = run("train", small_corpus, "--db", db, "--iters", 40, "--resume", "--lr", 0.002,
                 "--batch-size", 8, "--dropout", 0.1)
    assert result.exit_code == 0, result.output
    assert "resuming at step 30 with" in result.output and "--lr 0.002 (was" in result.output
    assert "--batch-size 8 (was 4)" in result.output
    model = sqlgpt.load(db)
    assert model.step == 40 and model.train_config.lr == 0.002
    assert model.train_config.batch_size == 8
    conn = store.open_database(db)
    changes = store.read_train_state(conn)["setting_changes"]
    conn.close()
    assert changes == [{"step": 31, "lr": {"was": was.lr, "now": 0.002},
                        "batch_size": {"was": 4, "now": 8},
                        "dropout": {"was": was.dropout, "now": 0.1}}]
    # the model itself, its tokenizer and its data stay: a new model takes --init-from
    before = db.read_bytes()
    result = run("train", "--db", db, "--iters", 50, "--resume", "--embed-dim", 64)
    assert result.exit_code == 1 and "--init-from" in result.output
    assert db.read_bytes() == before
