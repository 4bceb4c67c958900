from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner


@pytest.fixture
def rng(request):
    """Fresh random inputs per run, with the seed printed on failure."""
    seed = np.random.SeedSequence().entropy % 2**32
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "tinyshakespeare.txt"
# a model small enough to train in seconds
TINY = ["--embed-dim", "32", "--heads", "4", "--layers", "2", "--seq-len", "16",
        "--batch-size", "4", "--vocab-size", "100"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The first 20,000 characters of the example corpus."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(CORPUS.read_text()[:20000])
    return path


@pytest.fixture(scope="session")
def trained_db(tmp_path_factory, small_corpus):
    """A tiny model trained for 30 steps (shared, read-only: copy before writing)."""
    from sqlgpt.cli import main
    db = tmp_path_factory.mktemp("db") / "model.db"
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--db", str(db),
                                       "--iters", "30", "--save-every", "10", *TINY])
    assert result.exit_code == 0, result.output
    return db
