"""Nothing lost, nothing crashes: kills mid-checkpoint, signals, numerical
faults, storage faults, concurrent use."""
import contextlib
import os
import random
import signal
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.cli import main
from sqlgpt.store import connection as store_connection
from sqlgpt.errors import SqlgptError
from sqlgpt.train.trainer import Trainer

from helpers import weights_bytes
from conftest import TINY

HERE = Path(__file__).resolve().parent
# a model whose checkpoint takes a noticeable time, trained in small steps
CRASH_MODEL = ["--embed-dim", "128", "--heads", "4", "--layers", "2", "--seq-len", "16",
               "--batch-size", "2", "--vocab-size", "400"]


def start_training(corpus, db, iters, *extra, marker=None):
    script = [str(HERE / "crash_driver.py"), str(marker)] if marker else \
        ["-c", "from sqlgpt.cli import main; main(prog_name='sqlgpt')"]
    return subprocess.Popen([sys.executable, *script, "train", str(corpus), "--db", str(db),
                             "--iters", str(iters), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tempfile.gettempdir())


def committed_step(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT max(step) FROM checkpoints").fetchone()[0]
    finally:
        conn.close()


def wait_until(predicate, timeout=60.0, poll=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(poll)




def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path, small_corpus):
    """24 SIGKILLs, half of them inside the checkpoint transaction; after each,
    the file is intact, the last checkpoint loads and generates, and resuming
    goes on from it. The end result equals one uninterrupted run."""
    rng = random.Random(os.getpid())
    db, marker, total = tmp_path / "m.db", tmp_path / "saving", 400
    first = start_training(small_corpus, db, total, *CRASH_MODEL, "--save-every", 1,
                           marker=marker)
    wait_until(lambda: db.exists() and committed_step(db) >= 1)
    proc, kills_mid_save, steps = first, 0, []
    for kill in range(24):
        if kill % 2 == 0:   # aim inside a checkpoint transaction
            wait_until(marker.exists, poll=0.0002)
            time.sleep(rng.uniform(0, 0.002))
        else:               # anywhere
            time.sleep(rng.uniform(0.01, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills_mid_save += marker.exists()  # left behind only by a kill mid-transaction
        marker.unlink(missing_ok=True)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        model = sqlgpt.load(db)
        assert model.step == committed_step(db)
        assert len(model.generate("the", max_tokens=3, seed=0).split()) == 4
        steps.append(model.step)
        proc = start_training(small_corpus, db, total, "--save-every", 1, "--resume",
                              marker=marker)
        wait_until(lambda: committed_step(db) > steps[-1] or proc.poll() is not None)
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()
    print(f"{kills_mid_save} of 24 kills landed inside a checkpoint transaction")
    assert kills_mid_save >= 6, kills_mid_save
    assert steps == sorted(steps) and steps[-1] < total
    straight = tmp_path / "straight.db"
    result = start_training(small_corpus, straight, total, *CRASH_MODEL, "--save-every", 50)
    assert result.wait(timeout=300) == 0
    assert weights_bytes(straight) == weights_bytes(db)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_checkpoint_and_exits(tmp_path, small_corpus, sig, code):
    db = tmp_path / "m.db"
    proc = start_training(small_corpus, db, 100000, *TINY, "--save-every", 100000)
    conn = None

    def trained_some():
        nonlocal conn
        if conn is None and db.exists():
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        return conn is not None and conn.execute("SELECT count(*) FROM metrics").fetchone()[0] >= 3
    wait_until(trained_some)
    conn.close()
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "checkpoint saved" in stderr
    step = committed_step(db)
    assert step >= 3 and sqlgpt.load(db).step == step
    last_metric = sqlite3.connect(db).execute("SELECT max(step) FROM metrics").fetchone()[0]
    assert last_metric == step  # the step in flight was finished, then saved


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    trainer = Trainer.resume(db, [small_corpus])
    # the file may not grow: the history rows soon need a page it cannot get
    pages = trainer.conn.execute("PRAGMA page_count").fetchone()[0]
    trainer.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(SqlgptError, match="full"):
        trainer.run(5000, save_every=1)
    assert not trainer.conn.in_transaction
    trainer.close()
    assert store.integrity_check(db) == []
    model = sqlgpt.load(db)
    assert 30 < model.step < 5000
    assert sqlgpt.load(db).step == committed_step(db)


@contextlib.contextmanager
def small_filesystem(tmp_path, size):
    """A tmpfs of size (e.g. "4m") mounted under tmp_path, unmounted after."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_filesystem(tmp_path, trained_db, small_corpus):
    with small_filesystem(tmp_path, "4m") as mnt:
        db = mnt / "m.db"
        shutil.copy(trained_db, db)
        filler = mnt / "filler"
        # room to switch to WAL mode (a 64 KB page through a journal); the WAL soon runs out
        with open(filler, "wb") as f:
            f.write(b"\0" * (os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize - 512 * 1024))
        trainer = Trainer.resume(db, [small_corpus])
        with pytest.raises(SqlgptError):
            trainer.run(1000, save_every=1)
        trainer.close()
        filler.unlink()
        assert store.integrity_check(db) == []
        assert sqlgpt.load(db).step >= 30


def test_read_only_database_or_directory(tmp_path, trained_db, small_corpus):
    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "m.db"
    shutil.copy(trained_db, db)
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only mount
        if subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode \
                or subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)],
                                  capture_output=True).returncode:
            pytest.skip("cannot make a read-only mount here")
    else:
        db.chmod(0o444)
        ro.chmod(0o555)
    try:
        before = db.read_bytes()
        with pytest.raises(SqlgptError, match="read-only|cannot write"):
            Trainer.resume(db, [small_corpus])
        assert db.read_bytes() == before
        assert sqlgpt.load(db).step == 30  # reading still works
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        else:
            ro.chmod(0o755)


def test_a_writer_lock_held_by_another_process(tmp_path, trained_db, small_corpus, monkeypatch):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    monkeypatch.setattr(store_connection, "BUSY_TIMEOUT_MS", 300)  # where _connect reads it
    trainer = Trainer.resume(db, [small_corpus])
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another app holds the write lock
    with pytest.raises(SqlgptError, match="locked"):
        trainer.run(40, save_every=1)
    other.execute("ROLLBACK")
    other.close()
    trainer.close()
    assert sqlgpt.load(db).step == 30


def test_two_trainers_are_refused(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    first = start_training(small_corpus, db, 100000, "--resume", "--save-every", 5)
    wait_until(lambda: committed_step(db) > 30)
    second = start_training(small_corpus, db, 100000, "--resume")
    assert second.wait(timeout=60) == 1
    assert "another sqlgpt process" in second.stderr.read()
    overwrite = start_training(small_corpus, db, 10, *TINY, "--overwrite")
    assert overwrite.wait(timeout=60) == 1
    assert "another sqlgpt process" in overwrite.stderr.read()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143
    assert store.integrity_check(db) == []


def test_readers_and_generate_work_while_training_writes(tmp_path, trained_db, small_corpus):
    db = tmp_path / "m.db"
    shutil.copy(trained_db, db)
    proc = start_training(small_corpus, db, 100000, "--resume", "--save-every", 1)
    try:
        seen = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            model = sqlgpt.load(db)  # checksums prove each load is one whole checkpoint
            model.generate("the", max_tokens=2, seed=1)
            seen.add(model.step)
        assert len(seen) >= 3, seen
        assert proc.poll() is None  # training was never blocked into failing
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143


def test_a_full_filesystem_while_a_model_is_created_leaves_nothing(tmp_path, small_corpus):
    """Whatever point of creation the disk fills at (the rows, the first
    checkpoint, folding the write-ahead log in), the path holds no model and
    no temporary file is left; with room, the same command makes it whole."""
    with small_filesystem(tmp_path, "24m") as mnt:
        args = ["train", str(small_corpus), "--db", str(mnt / "w.db"), "--iters", "1",
                "--embed-dim", "32", "--heads", "4", "--layers", "2"]
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        for room_kb in (3584, 4096, 4608, 5632, 6656):
            filler = mnt / "filler"
            filler.write_bytes(b"\0" * (free - room_kb * 1024))
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 1 and "full" in result.output, (room_kb, result.output)
            assert "Traceback" not in result.output
            assert sorted(p.name for p in mnt.iterdir()) == ["filler"], room_kb
            filler.unlink()
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert store.integrity_check(mnt / "w.db") == []
