"""The kernel's thread count: fixed by the user, or chosen step by step by
the governor (csrc/governor.c). Its speed under load is a benchmark's
(benchmarks/load_bench.py); these check its decisions and the options."""
import os
import subprocess
import sys
import textwrap

import pytest

import sqlgpt
from sqlgpt._kernel import ffi, lib

from conftest import TINY


def run(*args):
    from click.testing import CliRunner
    from sqlgpt.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])

needs_two = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or
                               len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")

# A busy core: the team's second thread bound to a CPU that a spinning
# process holds (the first has its own), so every barrier of a step waits
# for that thread's time slice. The governor must find that one thread
# decodes faster.
CROWDED = textwrap.dedent("""
    import sys
    import numpy as np
    import sqlgpt
    from sqlgpt._kernel import ffi, lib
    from sqlgpt.inference.decoder import Decoder
    from sqlgpt.inference.generate import generate_ids
    from sqlgpt.model.arch import preset
    from sqlgpt.model.model import GPT
    lib.set_thread_ceiling(2)
    model = GPT(preset("lua", n_vocab=64, embed_dim=256, num_heads=4, num_layers=4,
                       seq_len=256))
    model.init_weights(np.random.default_rng(0))
    decoder = Decoder(model, "fp32")
    for _ in range(3):
        list(generate_ids(decoder, [1, 2, 3], 200, 0))
    print(lib.governed_threads(decoder.tensors.struct.wte))
""")


@needs_two
def test_the_governor_decodes_on_one_thread_beside_a_busy_core(tmp_path):
    first, second = sorted(os.sched_getaffinity(0))[:2]
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\n"
                                f"os.sched_setaffinity(0, {{{second}}})\nwhile True: pass"])
    try:
        out = subprocess.run([sys.executable, "-c", CROWDED], capture_output=True,
                             text=True, timeout=600, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "",
                                  "GOMP_CPU_AFFINITY": f"{first} {second}"})
    finally:
        spinner.kill()
        spinner.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"


def test_a_fixed_count_is_not_governed():
    key = ffi.new("int *")
    try:
        sqlgpt.set_threads(1)
        assert lib.max_threads() == 1 and lib.governed_threads(key) == 1
        sqlgpt.set_threads("auto")
        from sqlgpt.model.cpus import usable_cpus
        assert lib.max_threads() == usable_cpus()
        assert lib.governed_threads(key) == usable_cpus()  # a key never run: the ceiling
    finally:
        sqlgpt.set_threads("auto")


@pytest.mark.parametrize("bad", [0, -1, 4097, 1.5, "two", True, None])
def test_set_threads_refuses_what_is_not_a_count(bad):
    with pytest.raises(sqlgpt.SqlgptError, match="auto"):
        sqlgpt.set_threads(bad)


def test_units_nest_and_end_whole():
    """A unit inside a unit is part of it; the count comes back to zero."""
    key = ffi.new("int *")
    lib.threads_unit_begin(key, 64.0)
    lib.threads_unit_begin(key, 64.0)
    assert lib.threads_unit_depth() == 2
    lib.threads_unit_end()
    lib.threads_unit_end()
    assert lib.threads_unit_depth() == 0


def test_decoding_gives_the_same_ids_on_any_thread_count():
    """Why the governor may change the count of a decode step and not of a
    training step: each decode output is computed by one thread in a fixed
    order, so its logits do not depend on the count (a training step's
    sums do: a resumed run must equal an uninterrupted one)."""
    import numpy as np
    from sqlgpt.inference.decoder import Decoder
    from sqlgpt.model.arch import preset
    from sqlgpt.model.model import GPT
    model = GPT(preset("llama", n_vocab=64, embed_dim=256, num_heads=4, num_layers=2,
                       seq_len=64))
    model.init_weights(np.random.default_rng(0))
    runs = []
    try:
        for n in (1, 2, 3):
            sqlgpt.set_threads(n)
            decoder = Decoder(model, "fp32")
            logits = [decoder.prefill([1, 2, 3, 4, 5]).copy()]
            logits += [decoder.step(t).copy() for t in range(6, 30)]
            runs.append(np.stack(logits))
    finally:
        sqlgpt.set_threads("auto")
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("value,code,text", [
    ("auto", 0, None), ("1", 0, None), ("0", 2, "is not auto or an integer"),
    ("two", 2, "is not auto or an integer"),
])
def test_the_threads_option(tmp_path, small_corpus, value, code, text):
    try:
        result = run("train", small_corpus, "--db", tmp_path / "m.db", "--iters", 1, *TINY,
                     "--threads", value)
    finally:
        sqlgpt.set_threads("auto")
    assert result.exit_code == code, result.output
    if text:
        assert text in result.output
