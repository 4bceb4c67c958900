"""Smoke test of the benchmark harness: it runs end to end at tiny sizes, and
its PyTorch baseline is the same model as sqlgpt's."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def test_bench_tiny_runs_and_prints_the_table(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "2", "--markdown",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train tokens/s" in proc.stdout
    assert "| train tokens/s |" in proc.stdout  # the Markdown table too
    tiny = json.loads(out.read_text())["configs"]["tiny"]
    assert tiny["train"]["sqlgpt"]["tokens_per_s"] > 0
    if "loss_check" in tiny:  # PyTorch is installed: same weights must give the same loss
        assert tiny["loss_check"]["rel_diff"] < 1e-4


def test_mpi_bench_tiny_runs_and_prints_both_tables(tmp_path):
    import pytest
    pytest.importorskip("mpi4py")
    out = tmp_path / "mpi.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--mpi", "--tiny", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    if "no mpiexec" in proc.stderr:
        pytest.skip("no mpiexec")
    assert proc.returncode == 0, proc.stderr
    assert "ranks x 1, --zero 1" in proc.stdout and "100M (modeled)" in proc.stdout
    results = json.loads(out.read_text())
    sides = results["configs"]["tiny"]["sides"]
    assert all(side["tokens_per_s"] > 0 for side in sides.values())
    assert results["configs"]["tiny"]["grad_bytes"] > 0
    assert 0 < results["100M"]["scaling"]["64"]["1"][0] <= 1


def test_extension_bench_tiny_runs(tmp_path):
    import shutil
    import pytest
    import sqlgpt
    try:
        sqlgpt.extension_path()
    except sqlgpt.SqlgptError:
        pytest.skip("the extension is not built")
    if not shutil.which("sqlite3"):
        pytest.skip("no sqlite3 shell")
    out = tmp_path / "ext.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--extension", "--tiny", "--out",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tiny = json.loads(out.read_text())["tiny"]
    assert tiny["shell_tokens_per_s"] > 0 and tiny["python_tokens_per_s"] > 0
    assert tiny["same_text"]


def baby_rows(script, tmp_path):
    """The Markdown rows of the baby config a benchmark script prints (one round)."""
    proc = subprocess.run([sys.executable, str(BENCH.parent / script), "--configs", "baby",
                           "--rounds", "1", "--markdown"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| baby |")]


def test_decode_steps_reports_every_row_count(tmp_path):
    rows = baby_rows("decode_steps.py", tmp_path)
    assert [int(r[1]) for r in rows] == [1, 2, 4, 8, 16]
    assert rows[0][4].strip() == "1.00x"
    assert all(float(r[2]) > 0 and float(r[6]) > 0 for r in rows)  # ms/step, GFLOP/s


def test_generate_overhead_reports_each_path(tmp_path):
    rows = baby_rows("generate_overhead.py", tmp_path)
    assert [r[1].strip() for r in rows] == ["C step alone", "generate(), greedy",
                                            "generate(), sampled", "generate_ids(), sampled"]
    assert all(float(r[3].strip().rstrip("%")) > 0 for r in rows)


def test_the_serve_benchmark_and_soak_run_end_to_end(tmp_path):
    import pytest
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    here = BENCH.parent
    proc = subprocess.run([sys.executable, str(here / "serve_bench.py"), "--config",
                           "llama-baby", "--clients", "1,2", "--json", str(tmp_path / "s.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    levels = json.loads((tmp_path / "s.json").read_text())
    assert [r["clients"] for r in levels] == [1, 2] and all(r["aggregate"] > 0 for r in levels)
    proc = subprocess.run([sys.executable, str(here / "serve_soak.py"), "--requests", "80",
                           "--clients", "4"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "0 differ" in proc.stdout


def test_the_llamacpp_benchmarks_files_import_and_run(tmp_path):
    """benchmarks/llamacpp_bench.py's GGUF files (each format) import into
    sqlgpt and run its side of the benchmark (llama.cpp itself is not here)."""
    import pytest
    pytest.importorskip("gguf")
    import numpy as np
    sys.path.insert(0, str(BENCH.parent))
    import llamacpp_bench
    from sqlgpt.model.arch import preset
    arch = preset("llama", n_vocab=300, embed_dim=64, num_heads=4, kv_heads=2, num_layers=2,
                  ffn_dim=96, seq_len=64, tie_weights=True, qkv_bias=True).validate()
    llamacpp_bench.PROMPT, llamacpp_bench.NEW, llamacpp_bench.ROUNDS = 16, 8, 1
    for fmt in llamacpp_bench.FORMATS:
        path = tmp_path / f"m-{fmt}.gguf"
        llamacpp_bench.write_gguf(path, arch, fmt, np.random.default_rng(0))
        result = llamacpp_bench.sqlgpt_side(path, fmt, tmp_path)
        assert result["pp"] > 0 and result["tg"] > 0 and result["db_mb"] > 0
