"""The model profile of `sqlgpt info`: parameter counts from the tensor
table, FLOPs per token, and a memory estimate within 25% of the peak RSS a
training run really reaches."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.model.arch import preset
from sqlgpt.cli import main
from sqlgpt.model.profile import model_profile

RUN_AND_MEASURE = """
import re, sys
from sqlgpt.cli import main
sys.argv = ["sqlgpt", "train", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1)) / 1024)
"""


def test_parameters_and_flops():
    arch = preset("gpt2", n_vocab=65, embed_dim=128, num_heads=4, num_layers=4, seq_len=64)
    profile = model_profile(arch, 12)
    assert profile["parameters"]["total"] == sqlgpt.model.model.GPT(arch).params.size
    C, L = 128, 4
    assert profile["parameters"]["attention"] == L * (4 * C * C + 4 * C)
    matmul = L * 12 * C * C + C * 65  # the tied head still multiplies
    assert profile["flops_per_token"]["training"] == 6 * matmul + 6 * L * 64 * C


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's shadow memory and quarantine are not sqlgpt's")
@pytest.mark.parametrize("options", [
    [],  # the lua defaults: activations dominate
    ["--preset", "gpt2", "--tokenizer", "char", "--embed-dim", "256", "--layers", "4",
     "--heads", "8", "--seq-len", "128", "--batch-size", "8"],  # weights and moments weigh more
    ["--checkpoint-activations"],  # the lua defaults keeping one block's activations
], ids=["lua", "gpt2-256", "lua-checkpointed"])
def test_the_memory_estimate_is_within_a_quarter_of_the_peak(tmp_path, small_corpus, options):
    corpus = tmp_path / "c.txt"
    corpus.write_text(small_corpus.read_text() * 8)  # enough tokens for seq 256
    db = tmp_path / "m.db"
    proc = subprocess.run([sys.executable, "-c", RUN_AND_MEASURE, str(corpus), "--db", str(db),
                           "--iters", "2", "--save-every", "1", *options],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peak = float(proc.stdout.strip().splitlines()[-1])
    info = json.loads(CliRunner().invoke(main, ["info", "--db", str(db), "--json"]).output)
    estimate = info["profile"]["memory_mb"]["total"]
    assert abs(estimate - peak) / peak < 0.25, (estimate, peak)
