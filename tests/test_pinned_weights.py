"""The presets train to the weights earlier releases trained to.

tests/data/lua_50_steps.npz holds the weights of a tiny lua model after 50
steps (dropout 0.2, seed 1337, the first 20,000 characters of the example
corpus), written by release c523d19 with one thread; gpt2_50_steps.npz and
llama_50_steps.npz the same recipe's gpt2 and llama (kv heads 2) models
with a 300-id BPE tokenizer, written by release 3c655de (before the package
was regrouped around one contract) with one thread. On the machine that
wrote it, this code gives the same weights bit for bit (one thread or two;
the summation order of every op is unchanged). Another CPU's SIMD width and
another thread count reorder sums, which moves weights by up to ~1e-6 after
50 steps: the test allows 1e-5, relative per tensor."""
import os
import subprocess
import sys

import numpy as np
import pytest

import sqlgpt

from conftest import ROOT
from helpers import rel_err

DATA = ROOT / "tests" / "data"
RECIPE = ["--iters", "50", "--save-every", "25", "--embed-dim", "32", "--heads", "4",
          "--layers", "2", "--seq-len", "16", "--batch-size", "4"]
# preset -> its options beyond the recipe
PRESETS = {"lua": ["--vocab-size", "100"],
           "gpt2": ["--preset", "gpt2", "--vocab-size", "300"],
           "llama": ["--preset", "llama", "--kv-heads", "2", "--vocab-size", "300"]}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_trains_to_the_previous_release_weights(tmp_path, small_corpus, preset):
    db = tmp_path / f"{preset}.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sqlgpt.cli", "train", str(small_corpus), "--db",
                    str(db), *RECIPE, *PRESETS[preset]], env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    expected = np.load(DATA / f"{preset}_50_steps.npz")
    weights = sqlgpt.load(db).state_dict()
    assert sorted(weights) == sorted(expected.files)
    for name, array in weights.items():
        if name.endswith(".k_b"):
            # a key bias adds the same score to every key a query sees, which
            # softmax ignores: its gradient is zero but for rounding, and its
            # values are that rounding's noise (~1e-7), of no effect
            assert np.abs(array).max() < 1e-4 and np.abs(expected[name]).max() < 1e-4, name
            continue
        assert rel_err(array, expected[name]) < 1e-5, name
