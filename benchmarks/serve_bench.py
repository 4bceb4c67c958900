"""sqlgpt serve under concurrent streaming clients: aggregate tokens/s,
each request's tokens/s, and time to first token (p50, p99), at 1, 2, 4, 8
and 16 clients, in one run.

    python benchmarks/serve_bench.py [--config llama-small] [--db model.db]
                                     [--clients 1,2,4,8,16] [--markdown]
                                     [--llama-server PATH/llama-server]

The model is a config of benchmarks/bench.py (random weights after one
training step on the example corpus: decoding speed does not depend on what
the weights say) or any --db (an imported 135M model, say). The server runs
in a child process with --slots 16; each client streams /v1/completions of
NEW_TOKENS tokens (ignore_eos, so every request makes all of them) after a
PROMPT_WORDS-word prompt (fewer where the context is short), ROUNDS times one after another. Aggregate is every
token over the wall time of the level; per request, a request's tokens over
its own time; time to first token, from sending to the first streamed text.

With --llama-server, llama.cpp's server runs the same model (sqlgpt's GGUF
export, f32) with as many slots (-np) and a context of seq_len per slot, on
2 threads, and the same clients stream from it in the same run; the table
then has a row per side at each level.

The goals it checks: 8 clients at least 4x the aggregate tokens/s of one;
and time to first token, with slots free, within one decode step plus the
prompt's own step (here: a request's time per token plus its prompt's time
alone, measured at one client).
"""
import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import CONFIGS  # noqa: E402
from tables import render  # noqa: E402

NEW_TOKENS = 64
PROMPT_WORDS = 24
ROUNDS = 3
EXTRA = []
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"


def make_model(config, folder):
    """A database of the config: one training step on the example corpus."""
    spec = CONFIGS[config]
    db = Path(folder) / f"{config}.db"
    options = ["--preset", spec["preset"], "--embed-dim", str(spec["embed_dim"]),
               "--heads", str(spec["num_heads"]), "--layers", str(spec["num_layers"]),
               "--seq-len", str(spec["seq_len"]), "--iters", "1", "--batch-size", "1",
               "--tokenizer", "bpe", "--vocab-size", str(max(300, spec.get("n_vocab", 428)))]
    if spec.get("kv_heads"):
        options += ["--kv-heads", str(spec["kv_heads"])]
    subprocess.run([sys.executable, "-m", "sqlgpt.cli", "train", str(CORPUS), "--db", str(db),
                    *options], check=True, capture_output=True, cwd=folder)
    return db


def start_server(db, slots):
    proc = subprocess.Popen([sys.executable, "-m", "sqlgpt.cli", "serve", "--db", str(db),
                             "--port", "0", "--slots", str(slots), "--queue", "1000", *EXTRA],
                            stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    for line in proc.stderr:
        if line.startswith("serving"):
            return proc, line.split(" at ")[1].split("/v1")[0]
    raise SystemExit("the server did not start")


def start_llama_server(binary, db, slots, folder):
    """llama.cpp's server on the model's f32 GGUF export, when it answers."""
    import socket
    import sqlgpt
    from sqlgpt.api import export
    gguf = Path(folder) / "model.gguf"
    export(str(db), str(gguf), "gguf", dtype="f32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = sqlgpt.load(db).arch.seq_len
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--port", str(port), "-np", str(slots),
                             "-c", str(slots * context), "-t", "2", "-cb", "--log-disable"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{binary} did not start")


def fitting_prompt(db):
    """(the first PROMPT_WORDS words of the corpus, or fewer: at most a
    quarter of the model's context, and the tokens that leave)."""
    import sqlgpt
    model = sqlgpt.load(db)
    words = CORPUS.read_text().split()[:PROMPT_WORDS]
    while len(words) > 1 and len(model.encode(" ".join(words))) > model.arch.seq_len // 4:
        words.pop()
    prompt = " ".join(words)
    return prompt, min(NEW_TOKENS, model.arch.seq_len - len(model.encode(prompt)))


async def one_request(client, url, prompt, new_tokens):
    """(seconds to the first text, seconds in all, tokens) of one streamed request."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                tokens += 1
                first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, tokens


async def level(url, clients, prompt, new_tokens):
    import httpx
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            return [await one_request(client, url, prompt, new_tokens) for _ in range(ROUNDS)]
        start = time.perf_counter()
        runs = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in runs)
    return {"clients": clients, "aggregate": sum(r[2] for r in runs) / wall,
            "per_request": statistics.median(r[2] / r[1] for r in runs),
            "ttft_p50": firsts[len(firsts) // 2],
            "ttft_p99": firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-small", choices=sorted(CONFIGS))
    parser.add_argument("--db", default=None, help="serve this model instead of a config's")
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--llama-server", default=None,
                        help="a llama.cpp llama-server binary to run beside sqlgpt")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    sides = {}
    with tempfile.TemporaryDirectory() as folder:
        db = args.db or make_model(args.config, folder)
        prompt, new_tokens = fitting_prompt(db)
        starts = {"sqlgpt": lambda: start_server(db, max(levels))}
        if args.llama_server:
            starts["llama.cpp"] = lambda: start_llama_server(args.llama_server, db, max(levels),
                                                             folder)
        for side, start in starts.items():
            proc, url = start()
            try:
                asyncio.run(level(url, 1, prompt, new_tokens))  # warm: the first packs weights
                sides[side] = [asyncio.run(level(url, c, prompt, new_tokens)) for c in levels]
            finally:
                proc.terminate()
                proc.wait()
    rows = []
    for i, clients in enumerate(levels):
        for side, results in sides.items():
            r, base = results[i], results[0]["aggregate"]
            rows.append([str(clients), side, f"{r['aggregate']:,.0f}",
                         f"{r['aggregate'] / base:.2f}x", f"{r['per_request']:,.0f}",
                         f"{r['ttft_p50'] * 1000:,.0f}", f"{r['ttft_p99'] * 1000:,.0f}"])
        if len(sides) == 2:
            ours, theirs = (sides[s][i]["aggregate"] for s in sides)
            rows.append([str(clients), "sqlgpt / llama.cpp", f"{ours / theirs:.2f}x", "", "",
                         "", ""])
    print(render(["clients", "server", "aggregate tok/s", "vs 1 client", "per request tok/s",
                  "TTFT p50 ms", "TTFT p99 ms"], rows, args.markdown))
    results = sides["sqlgpt"]
    eight = next((r for r in results if r["clients"] == 8), None)
    if eight and results[0]["clients"] == 1:
        print(f"8 clients: {eight['aggregate'] / results[0]['aggregate']:.2f}x one client's "
              f"aggregate (goal: 4x)")
    if args.json:
        Path(args.json).write_text(json.dumps(sides if len(sides) > 1 else results, indent=2))


if __name__ == "__main__":
    main()
