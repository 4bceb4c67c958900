"""The lua preset trains to the weights the previous release trained to.

tests/data/lua_50_steps.npz holds the weights of a tiny lua model after 50
steps (dropout 0.2, seed 1337, the first 20,000 characters of the example
corpus), written by release c523d19 with one thread. On the machine that
wrote it, this code gives the same weights bit for bit (one thread or two;
the summation order of every op is unchanged). Another CPU's SIMD width and
another thread count reorder sums, which moves weights by up to ~1e-6 after
50 steps: the test allows 1e-5, relative per tensor."""
import os
import subprocess
import sys

import numpy as np

import sqlgpt

from conftest import ROOT
from helpers import rel_err

FIXTURE = ROOT / "tests" / "data" / "lua_50_steps.npz"
RECIPE = ["--iters", "50", "--save-every", "25", "--embed-dim", "32", "--heads", "4",
          "--layers", "2", "--seq-len", "16", "--batch-size", "4", "--vocab-size", "100"]


def test_lua_trains_to_the_previous_release_weights(tmp_path, small_corpus):
    db = tmp_path / "lua.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sqlgpt.cli", "train", str(small_corpus), "--db",
                    str(db), *RECIPE], env=env, cwd=tmp_path, check=True, capture_output=True)
    expected = np.load(FIXTURE)
    weights = sqlgpt.load(db).state_dict()
    assert sorted(weights) == sorted(expected.files)
    for name, array in weights.items():
        assert rel_err(array, expected[name]) < 1e-5, name
