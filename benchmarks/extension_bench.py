"""Generation from SQL: the loadable extension in the sqlite3 shell against
the Python path (sqlgpt.register on a Python sqlite3 connection), the same
SELECT sqlgpt_generate(...) on the same model file.

    python benchmarks/extension_bench.py [--configs baby,small,gpt2-small] [--tokens 64]
                                         [--repeats 3] [--tiny] [--markdown]
    (python benchmarks/bench.py --extension ... runs this)

Each model is made by `sqlgpt train` (one step on the example corpus) at
the size of benchmarks/bench.py's config. Each side loads the model once
(untimed, checking that both generate the same greedy text), then runs a
statement of 10 generations `repeats` times; the figure is the best
statement's tokens/s.
"""
import argparse
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
# config -> `sqlgpt train` options (bench.py's sizes; a word model for lua's)
CONFIGS = {
    "baby": ["--preset", "lua", "--embed-dim", "128", "--heads", "4", "--layers", "4",
             "--seq-len", "64"],
    "small": ["--preset", "lua", "--embed-dim", "384", "--heads", "6", "--layers", "6",
              "--seq-len", "256"],
    "gpt2-small": ["--preset", "gpt2", "--tokenizer", "char", "--embed-dim", "384", "--heads",
                   "6", "--layers", "6", "--seq-len", "256"],
    "llama-small": ["--preset", "llama", "--tokenizer", "char", "--embed-dim", "384",
                    "--heads", "6", "--kv-heads", "2", "--layers", "6", "--seq-len", "256"],
    "tiny": ["--preset", "gpt2", "--tokenizer", "char", "--embed-dim", "32", "--heads", "4",
             "--layers", "2", "--seq-len", "32"],
}
PROMPT = "the king"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="baby,small,gpt2-small,llama-small")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per query")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="one tiny model, for CI")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def make_model(name, directory):
    db = directory / f"{name}.db"
    subprocess.run([sys.executable, "-c", "from sqlgpt.cli import main; main()", "train",
                    str(CORPUS), "--db", str(db), "--iters", "1", "--batch-size", "2",
                    *CONFIGS[name]], check=True, capture_output=True, cwd=directory)
    return db


RUNS = 10  # generations per timed statement: well above the shell timer's millisecond


def query(tokens):
    return f"SELECT sqlgpt_generate('{PROMPT}', {tokens}, 0)"


def timed_query(tokens):
    """RUNS generations in one statement (the function is not deterministic:
    SQLite calls it for every row)."""
    return (f"WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < {RUNS}) "
            f"SELECT count({query(tokens)[7:]}) FROM r")


def shell_side(db, tokens, repeats):
    """(best seconds, text) from the sqlite3 shell's own timer."""
    import sqlgpt
    script = "\n".join([f".load {sqlgpt.extension_path()}", query(tokens) + ";", ".timer on",
                        *[timed_query(tokens) + ";"] * repeats])
    # on standard input: the shell's timer reports only there
    done = subprocess.run(["sqlite3", str(db)], input=script + "\n", capture_output=True,
                          text=True, check=True)
    times = [float(t) for t in re.findall(r"Run Time: real ([0-9.]+)", done.stdout)]
    if len(times) != repeats:
        raise SystemExit(f"the sqlite3 shell did not time its queries:\n{done.stdout[-500:]}")
    text = done.stdout.split("\n")[0]
    return max(min(times), 1e-3) / RUNS, text  # the timer's resolution is a millisecond


def python_side(db, tokens, repeats):
    import sqlgpt
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, db)
    text = conn.execute(query(tokens)).fetchone()[0]  # warm: the decoder's weights packed
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        conn.execute(timed_query(tokens)).fetchone()
        best = min(best, (time.perf_counter() - start) / RUNS)
    return best, text


def main(args):
    if not shutil.which("sqlite3"):
        sys.exit("no sqlite3 shell (apt-get install sqlite3)")
    names = ["tiny"] if args.tiny else args.configs.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            db = make_model(name, Path(tmp))
            shell_s, shell_text = shell_side(db, args.tokens, args.repeats)
            python_s, python_text = python_side(db, args.tokens, args.repeats)
            results[name] = {"tokens": args.tokens, "shell_tokens_per_s": args.tokens / shell_s,
                             "python_tokens_per_s": args.tokens / python_s,
                             "same_text": shell_text == python_text.split("\n")[0]}
    from tables import render
    header = ["config", "sqlite3 shell tok/s", "Python path tok/s", "shell / Python",
              "same text"]
    rows = [[n, f"{r['shell_tokens_per_s']:,.0f}", f"{r['python_tokens_per_s']:,.0f}",
             f"{r['shell_tokens_per_s'] / r['python_tokens_per_s']:.2f}x",
             "yes" if r["same_text"] else "NO"] for n, r in results.items()]
    print(render(header, rows, False))
    if args.markdown:
        print(render(header, rows, True))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(parse_args())
