"""Data-parallel training under mpirun: 2 ranks on this host train the model
one process trains (the same global batch), with and without ZeRO-1;
resume across rank counts; start-up checks; a rank killed mid-step or
mid-checkpoint stops the job and leaves a resumable database."""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from sqlgpt import load as sqlgpt_load
from sqlgpt import store
from sqlgpt.model.model import GPT

from test_faults import committed_step, wait_until

pytest.importorskip("mpi4py")
HERE = Path(__file__).resolve().parent
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                        os.environ.get("PATH", "")]))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
# Open MPI refuses root without these; MPICH ignores them
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMP_NUM_THREADS": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
# batch 5 over 2 ranks: shares of 2 and 3 rows, so the weighting is tested too
MODEL = ["--preset", "gpt2", "--tokenizer", "char", "--layers", "2", "--embed-dim", "32",
         "--heads", "4", "--seq-len", "16", "--batch-size", "5", "--grad-accum", "2",
         "--dropout", "0.1", "--grad-clip", "0.5", "--save-every", "5", "--eval-iters", "2"]
CLI = ["-c", "from sqlgpt.cli import main; main(prog_name='sqlgpt')"]


def sqlgpt(*args, ranks=1, script=CLI, timeout=240, check=True):
    """sqlgpt ARGS in one plain process (ranks=1) or under mpiexec -n ranks."""
    command = [sys.executable, *script, *map(str, args)]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def train(corpus, db, iters, *extra, ranks=1):
    return sqlgpt("train", corpus, "--db", db, "--iters", iters, *MODEL, *extra, ranks=ranks)


def losses(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return np.array(conn.execute("SELECT loss FROM metrics ORDER BY step").fetchall())[:, 0]
    finally:
        conn.close()


def checkpoint_arrays(db):
    """The latest checkpoint's weights and Adam moments, by tensor and buffer."""
    conn = store.open_database(db)
    try:
        arch, _ = store.read_config(conn)
        model = GPT(arch)
        store.read_weights(conn, model)
        return {f"{t.name}.{buf}": getattr(t, buf).copy() for t in model.params
                for buf in ("data", "m", "v")}
    finally:
        conn.close()


def assert_same_training(a, b):
    """Losses step by step and the final weights and moments within float
    tolerance (the ranks sum their gradients in another order)."""
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5)
    arrays_a, arrays_b = checkpoint_arrays(a), checkpoint_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name, array in arrays_a.items():
        np.testing.assert_allclose(arrays_b[name], array, rtol=1e-3, atol=1e-5, err_msg=name)


def assert_identical(a, b):
    assert np.array_equal(losses(a), losses(b))
    arrays_a, arrays_b = checkpoint_arrays(a), checkpoint_arrays(b)
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpi") / "corpus.txt"
    path.write_text((HERE.parent / "examples" / "tinyshakespeare.txt").read_text()[:30000])
    return path


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process, 15 steps: what every run below must reproduce."""
    db = tmp_path_factory.mktemp("single") / "one.db"
    train(corpus, db, 15)
    return db


@pytest.mark.parametrize("zero", ["0", "1"])
def test_two_ranks_train_the_model_one_process_trains(corpus, single, tmp_path, zero):
    db = tmp_path / "two.db"
    out = train(corpus, db, 15, "--zero", zero, "--json", ranks=2)
    assert out.stdout.count('"step": 15') == 1  # rank 0 alone reports
    assert len(losses(db)) == 15
    assert_same_training(single, db)
    assert sqlgpt("check", "--db", db).returncode == 0


def test_zero_1_updates_exactly_as_every_rank_does(corpus, tmp_path):
    plain, zero = tmp_path / "plain.db", tmp_path / "zero.db"
    train(corpus, plain, 6, ranks=2)
    train(corpus, zero, 6, "--zero", "1", ranks=2)
    assert_identical(plain, zero)


def test_resume_from_two_ranks_into_one_and_back(corpus, single, tmp_path):
    db = tmp_path / "model.db"
    train(corpus, db, 5, ranks=2)
    sqlgpt("train", "--db", db, "--resume", "--iters", 10)
    sqlgpt("train", "--db", db, "--resume", "--iters", 15, "--zero", "1", ranks=2)
    assert_same_training(single, db)


def test_one_rank_under_mpiexec_is_the_plain_process(corpus, single, tmp_path):
    db = tmp_path / "one_rank.db"
    done = subprocess.run([MPIEXEC, "-n", "1", sys.executable, *CLI, "train", str(corpus),
                           "--db", str(db), "--iters", "15", *MODEL], env=ENV,
                          capture_output=True, text=True, timeout=240, cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    assert_identical(single, db)


def test_a_lora_fine_tune_on_two_ranks(corpus, single, tmp_path):
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    tune = ["--base", single, "--lora-rank", "4", "--lora-dropout", "0.1", "--lr", "0.01"]
    sqlgpt("finetune", corpus, "--db", one, "--iters", 6, *tune, "--save-every", 3)
    sqlgpt("finetune", corpus, "--db", two, "--iters", 6, *tune, "--save-every", 3, ranks=2)
    np.testing.assert_allclose(losses(one), losses(two), rtol=1e-5)
    a, b = (sqlgpt_load(db).state_dict() for db in (one, two))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3, atol=1e-5, err_msg=name)


def mpmd(*commands):
    """mpiexec with one rank per argument list (MPI's colon syntax)."""
    argv = [MPIEXEC]
    for i, args in enumerate(commands):
        argv += ([":"] if i else []) + ["-n", "1", sys.executable, *CLI, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=240,
                          cwd=tempfile.gettempdir())


@pytest.mark.parametrize("differs", ["corpus", "options", "missing"])
def test_ranks_must_agree_or_all_stop_with_one_message(corpus, tmp_path, differs):
    db = tmp_path / "model.db"
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[:20000])
    base = ["train", corpus, "--db", db, "--iters", 3, *MODEL]
    second = {"corpus": ["train", other, "--db", db, "--iters", 3, *MODEL],
              "options": base + ["--lr", "0.002"],
              "missing": ["train", tmp_path / "gone.txt", "--db", db, "--iters", 3, *MODEL]}
    done = mpmd(base, second[differs])
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, done.stderr
    expected = {"corpus": "rank 1 has another corpus than rank 0",
                "options": "rank 1 has another options than rank 0",
                "missing": "rank 1 cannot read its corpus"}[differs]
    assert expected in lines[0]
    assert not db.exists()


def test_refusals_name_the_problem(corpus, tmp_path):
    db = tmp_path / "model.db"
    done = sqlgpt("train", "-", "--db", db, *MODEL, ranks=2, check=False)
    assert "standard input reaches rank 0 only" in done.stderr
    done = sqlgpt("train", corpus, "--db", db, "--zero", "1", *MODEL, check=False)
    assert done.returncode != 0 and "run under mpirun" in done.stderr
    # a rank's error while building the model: every rank stops, one message
    done = sqlgpt("train", corpus, "--db", db, *MODEL, "--heads", "5", ranks=2, check=False)
    assert done.returncode != 0 and done.stderr.count("Error") == 1, done.stderr
    assert not db.exists()
    done = sqlgpt("train", corpus, "--db", db, *MODEL, "--batch-size", "1", ranks=2,
                  check=False)
    assert done.returncode != 0 and "fewer sequences than the 2 ranks" in done.stderr
    assert done.stderr.count("Error") == 1, done.stderr


def test_a_launcher_without_mpi4py_is_refused(corpus, tmp_path):
    """PMI_SIZE=2 (as mpiexec sets it) but no mpi4py: one process would
    otherwise think it trains alone while another writes the same file."""
    blocker = tmp_path / "block"
    (blocker / "mpi4py").mkdir(parents=True)
    (blocker / "mpi4py" / "__init__.py").write_text("raise ImportError('no mpi4py')\n")
    env = {**ENV, "PMI_SIZE": "2", "PMI_RANK": "0",
           "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *CLI, "train", str(corpus), "--db",
                           str(tmp_path / "m.db"), *MODEL], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tempfile.gettempdir())
    assert done.returncode != 0 and "mpi4py is not installed" in done.stderr
    assert not (tmp_path / "m.db").exists()


def rank_pids(db):
    """{rank: pid} of the processes training db (by their launcher's variables)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if str(db) not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(item.split("=", 1) for item in
                       (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        except (OSError, ValueError):
            continue
        rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK"))
        if rank is not None and proc.name.isdigit():
            pids[int(rank)] = int(proc.name)
    return pids


@pytest.mark.parametrize("victim,moment", [(1, "step"), (1, "checkpoint"), (0, "checkpoint")])
def test_a_killed_rank_stops_the_job_and_the_database_resumes(corpus, tmp_path, victim,
                                                              moment):
    db, marker = tmp_path / "model.db", tmp_path / "saving"
    crash_model = [*MODEL, "--embed-dim", "128", "--save-every", "3"]
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, str(HERE / "crash_driver.py"),
                            str(marker), "train", str(corpus), "--db", str(db), "--iters",
                            "100000", *crash_model], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV, cwd=tempfile.gettempdir())
    try:
        wait_until(lambda: db.exists() and (committed_step(db) or 0) >= 3, timeout=120)
        if moment == "checkpoint":
            wait_until(marker.exists, timeout=60, poll=0.001)
        else:
            time.sleep(0.3)
        os.kill(rank_pids(db)[victim], signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=30)
        assert time.monotonic() - killed < 15
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0
    assert sqlgpt("check", "--db", db).returncode == 0
    step = committed_step(db)
    sqlgpt("train", "--db", db, "--resume", "--iters", step + 2, "--embed-dim", "128")
    assert committed_step(db) == step + 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_mpiexec_stops_every_rank_after_the_same_step(corpus, tmp_path, sig):
    """mpiexec passes the signal on; the ranks agree on the step to stop
    after, and rank 0 saves it."""
    db = tmp_path / "model.db"
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, *CLI, "train", str(corpus),
                            "--db", str(db), "--iters", "100000", *MODEL, "--save-every",
                            "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=ENV, cwd=tempfile.gettempdir())
    try:
        wait_until(lambda: db.exists() and committed_step(db) == 0, timeout=120)
        time.sleep(1.0)
        job.send_signal(sig)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    name = signal.Signals(sig).name
    assert err.count(f"stopped by {name}; checkpoint saved at step") == 1, err
    step = committed_step(db)
    assert step > 0 and f"saved at step {step}" in err
    assert sqlgpt("check", "--db", db).returncode == 0
