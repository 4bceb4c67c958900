"""Benchmark sqlgpt against the same model in PyTorch on this CPU.

    python benchmarks/bench.py [--configs lua,baby,small,gpt2-baby,...] [--sweep] [--tiny]
                               [--threads 2] [--steps 5] [--no-compile] [--markdown]
                               [--out results.json]
    python benchmarks/bench.py --mpi [--configs lua,small,gpt2-small] [--tiny] ...
    python benchmarks/bench.py --extension [--configs baby,small,gpt2-small] [--tiny] ...

For each config (a preset at a size: the lua preset at the original's size
and at nanoGPT's baby and small sizes, the gpt2 and llama presets at those
two, and llama at llama2.c's stories15M, which is generation only):
training tokens/s and model FLOPs utilization, greedy generation tokens/s,
checkpoint save/load time and size, and peak RSS while training, for
sqlgpt, PyTorch eager and torch.compile (PyTorch is optional: without it its
columns read n/a). The PyTorch side of each preset is that architecture as
its community writes it (benchmarks/torch_gpt.py: nanoGPT's model for gpt2,
a llama2.c-style model for llama). --sweep scales context length and width
on the lua architecture. --tiny is a seconds-long run for CI.

Training runs in a fresh subprocess per side (this script with --child), so
each side's peak RSS is its own and neither side's thread pool or allocator
state is left warm for the other. Generation, checkpoint I/O and an
equivalence check (same weights, same loss) run in this process.
"""
import argparse
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# sizes: the original's; nanoGPT's shakespeare-char "baby" (4 x 4 x 128,
# block 64, batch 12, 65 characters) and its 6 x 6 x 384 "small" at block 256
SIZES = {
    "lua": dict(n_vocab=428, embed_dim=128, num_heads=8, num_layers=6, seq_len=256,
                batch_size=32),
    "baby": dict(n_vocab=65, embed_dim=128, num_heads=4, num_layers=4, seq_len=64,
                 batch_size=12),
    "small": dict(n_vocab=428, embed_dim=384, num_heads=6, num_layers=6, seq_len=256,
                  batch_size=8),
}
CONFIGS = {  # name -> ArchConfig fields (a preset and its sizes) plus batch_size
    "lua": dict(preset="lua", **SIZES["lua"]),
    "baby": dict(preset="lua", **SIZES["baby"]),
    "small": dict(preset="lua", **SIZES["small"]),
    "gpt2-baby": dict(preset="gpt2", **SIZES["baby"]),
    "gpt2-small": dict(preset="gpt2", **SIZES["small"]),
    "llama-baby": dict(preset="llama", **SIZES["baby"], kv_heads=2),
    "llama-small": dict(preset="llama", **SIZES["small"], kv_heads=2),
    # llama2.c's stories15M: dim 288, 6 layers, 6 heads, hidden 768, 32000 tokens
    "stories15M": dict(preset="llama", n_vocab=32000, embed_dim=288, num_heads=6,
                       num_layers=6, seq_len=256, ffn_dim=768, batch_size=8),
}
GENERATE_ONLY = {"stories15M"}  # its 32000-token head makes training it a different test
TINY = dict(preset="lua", n_vocab=64, embed_dim=32, num_heads=4, num_layers=2, seq_len=16,
            batch_size=4)
TINY_LLAMA = dict(TINY, preset="llama", kv_heads=2)
DROPOUT = 0.2
LR = 3e-4
WARMUP_STEPS = 2        # first-step costs: buffer allocation, torch.compile's compilation
PROMPT_TOKENS = 16      # generation: prompt length and new tokens (capped to fit seq_len)
NEW_TOKENS = 64
BATCH = 8               # sequences generated together in the batched figures
CHILD_TIMEOUT_S = 1800  # torch.compile of the larger configs takes minutes on 2 cores
SWEEP = dict(seq_lens=(256, 1024, 2048), widths=(128, 256, 512, 768))
TINY_SWEEP = dict(seq_lens=(16, 32, 64), widths=(32, 64))
HEAD_WIDTH = 16         # the width sweep keeps heads = width / 16
POOL_IDLE_S = 0.5       # long enough for an idle BLAS/OpenMP pool to stop spinning


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--sweep", action="store_true", help="context-length and width sweep")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for CI (no torch.compile)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after warm-up)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also train with torch.compile (default: yes, except with --tiny)")
    p.add_argument("--generate-only", action="store_true",
                   help="skip training (generation and checkpoint figures only)")
    p.add_argument("--mpi", action="store_true",
                   help="data-parallel training instead: benchmarks/mpi_bench.py")
    p.add_argument("--extension", action="store_true",
                   help="the SQLite extension from the sqlite3 shell against the Python path "
                        "instead: benchmarks/extension_bench.py")
    p.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    p.add_argument("--out", type=Path, help="write every result as JSON here")
    p.add_argument("--child", choices=("sqlgpt", "torch", "torch_compile"),
                   help=argparse.SUPPRESS)  # internal: one side's training run
    p.add_argument("--arch", type=json.loads, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# The sqlgpt kernel's OpenMP pool and numpy's BLAS pool size themselves when
# their libraries load, so --threads must be in the environment before the
# imports below (children inherit it).
_CHILD = None
if __name__ == "__main__":
    _early = parse_args()
    _CHILD = _early.child
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_early.threads)

import numpy as np  # noqa: E402

from tables import render  # noqa: E402 (benchmarks/ is sys.path[0] as a script)

torch = None
load_file = save_file = None
if _CHILD != "sqlgpt":  # its peak RSS must be sqlgpt's alone, without torch's libraries
    try:
        import torch
        from torch_gpt import adam, build  # benchmarks/ is sys.path[0] as a script
    except ImportError:
        torch = None
if _CHILD is None:
    try:
        from safetensors.numpy import load_file, save_file
    except ImportError:
        pass


# ---- measuring ----
def timings(fn, repeats, warmup=1):
    """Wall times of repeats calls of fn(), after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, repeats):
    return statistics.median(timings(fn, repeats))


def elapsed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(measures, repeats, warmup=1):
    """{name: median of measure()} over repeats rounds, each round running
    every measure once in turn (after warmup untimed rounds): a drift of the
    machine's speed then falls on all of them alike, not on whichever ran
    last, so their ratios hold. Between PyTorch's measures ("torch...") and
    sqlgpt's, the pool that ran last is given time to stop spinning."""
    values = {name: [] for name in measures}
    last_side = None
    for round_ in range(warmup + repeats):
        for name, measure in measures.items():
            side = name.startswith("torch")
            if last_side is not None and side != last_side:
                time.sleep(POOL_IDLE_S)
            last_side = side
            value = measure()
            if round_ >= warmup:
                values[name].append(value)
    return {name: statistics.median(v) for name, v in values.items()}


def peak_rss_mb():
    """This process's peak resident set so far. Linux: VmHWM, because
    ru_maxrss survives exec and a child would report its parent's peak at
    fork time. Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s*(\d+) kB", status, re.M).group(1)) / 2**10
    except (OSError, AttributeError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def architecture(arch):
    """The ArchConfig of a config dict (its other keys ignored)."""
    from sqlgpt.model.arch import ArchConfig, preset
    fields = {k: v for k, v in arch.items() if k in ArchConfig.__dataclass_fields__}
    return preset(fields.pop("preset"), **fields)


def resolved(config, name):
    """A config with every ArchConfig field spelled out (the preset applied),
    as the children and the PyTorch peers read it."""
    return {**architecture(config).to_dict(), "batch_size": config["batch_size"],
            "dropout": DROPOUT, "name": name}


def flops_per_token(arch):
    """Training FLOPs per token, the PaLM/nanoGPT estimate for causal attention:
    6 * (matmul parameters) + 6 * layers * seq_len * width.
    6 = 2 (multiply-add) x 3 (forward, input grad, weight grad) per weight.
    Only weights that enter a matmul count (the tensor table's matrices and
    the head, tied or not); wte and wpe are row lookups. The attention term
    is QK^T and AV (2 * 2TC forward per token per layer) x 3 for backward,
    halved for the causal mask."""
    from sqlgpt.model.arch import tensor_table
    a = architecture(arch)
    matmul_params = sum(s.rows * s.cols for s in tensor_table(a)
                        if len(s.shape) == 2 and s.name not in ("wte", "wpe"))
    return 6 * matmul_params + 6 * a.num_layers * a.seq_len * a.embed_dim


def matmul_peak(threads, n, repeats):
    """The machine's float32 GEMM rate (FLOP/s) with these threads: the best of
    numpy and torch on n x n, the denominator of MFU."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    kernels = {"numpy": lambda: np.matmul(a, b, out=out)}
    if torch is not None:
        torch.set_num_threads(threads)
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        kernels["torch"] = lambda: torch.mm(ta, tb, out=tout)
    rates = {}
    for name, fn in kernels.items():
        rates[name] = 2 * n**3 / min(timings(fn, repeats))
        # BLAS worker threads busy-wait for a while after a call; on a 2-core
        # machine they would steal the cores from whatever is timed next.
        time.sleep(POOL_IDLE_S)
    return {"flops": max(rates.values()), "by_library": rates, "n": n}


def machine_info(threads):
    cpu = "unknown"
    try:
        cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(),
                        re.M).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "threads": threads,
            "python": sys.version.split()[0], "numpy": np.__version__,
            "torch": torch.__version__ if torch is not None else None}


# ---- one side's training run (in its own process) ----
def random_batch(arch):
    """The same (ids, targets) for every side; ids 1.. so no target is padding."""
    rng = np.random.default_rng(0)
    shape = (arch["batch_size"], arch["seq_len"])
    return [rng.integers(1, arch["n_vocab"], shape).astype(np.int32) for _ in range(2)]


def sqlgpt_train_step(arch, x, y):
    """One sqlgpt training step as sqlgpt.train runs it: zero, forward, backward, Adam."""
    from sqlgpt.model.model import GPT
    model = GPT(architecture(arch))
    model.init_weights(np.random.default_rng(0))

    def step(i):
        model.params.zero_grad()
        model.forward(x, y, dropout=arch["dropout"], dropout_seed=i)
        model.backward()
        model.optimizer_step(i, LR)
    return step


def torch_train_step(arch, x, y, compiled):
    model = build(arch).train()
    opt = adam(model, LR)
    forward = torch.compile(model) if compiled else model
    x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()

    def step(i):
        opt.zero_grad(set_to_none=True)
        forward(x, y).backward()
        opt.step()
    return step


def child_main(side, arch, threads, steps):
    """Train one side for warm-up + timed steps; print one JSON line."""
    x, y = random_batch(arch)
    start_rss = peak_rss_mb()
    if side == "sqlgpt":
        step = sqlgpt_train_step(arch, x, y)
    else:
        torch.set_num_threads(threads)
        step = torch_train_step(arch, x, y, compiled=side == "torch_compile")
    times = []
    for i in range(1, WARMUP_STEPS + steps + 1):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[WARMUP_STEPS:])
    print(json.dumps({"tokens_per_s": x.size / step_s, "step_s": times,
                      "start_rss_mb": start_rss, "peak_rss_mb": peak_rss_mb()}))


def train_in_child(side, arch, args):
    """A side's training result, or {"error": ...} if it failed (e.g. torch.compile)."""
    if side != "sqlgpt" and torch is None:
        return {"error": "torch is not installed"}
    cmd = [sys.executable, __file__, "--child", side, "--arch", json.dumps(arch),
           "--threads", str(args.threads), "--steps", str(args.steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- generation and equivalence, in this process ----
def generation_lengths(arch):
    """(prompt, new) token counts that fit one context window (the KV cache's reach)."""
    prompt = min(PROMPT_TOKENS, arch["seq_len"] // 4)
    return prompt, min(NEW_TOKENS, arch["seq_len"] - prompt)


def batch_greedy(decoder, prompts, n_new):
    """Greedy ids of every prompt, all of them in each batched decode step."""
    from sqlgpt.inference.sampling import Sampler
    from sqlgpt.inference.generate import generate_batch
    out = [[] for _ in prompts]
    for i, token in generate_batch(decoder, prompts, n_new, Sampler(temperature=0)):
        out[i].append(token)
    return out


def decode_phase_rate(tokens, per_step):
    """Tokens/s after the first step (the prompt's, which yields per_step
    tokens) of a run of tokens() (a generator): the decode phase alone, as
    llama.cpp's "eval" figure counts it, beside the whole run's rate."""
    count, start = 0, None
    for _ in tokens():
        count += 1
        start = start or time.perf_counter()
    return (count - per_step) / (time.perf_counter() - start)


def compare_generation(model, torch_model, arch, repeats):
    """Greedy tokens/s on one sequence for each side (sqlgpt decoding from
    float32, bfloat16, int8 and int4 weights), and on BATCH sequences at
    once; whether their tokens agree; the bytes of the matrices each
    precision streams per token."""
    from sqlgpt.inference.decoder import Decoder, PRECISIONS
    from sqlgpt.inference.generate import generate_ids
    from sqlgpt.model.quant import BITS, DEFAULT_GROUP, quantized_copy
    n_prompt, n_new = generation_lengths(arch)
    prompts = np.random.default_rng(1).integers(1, arch["n_vocab"], (BATCH, n_prompt)).tolist()
    prompt = prompts[0]
    runs, setup_s, matrix_bytes = {}, {}, {}
    weights = {t.name: t.data for t in model.params}
    for precision in PRECISIONS:
        start = time.perf_counter()
        blocks = quantized_copy(model.arch, weights, BITS[precision], DEFAULT_GROUP) \
            if precision in BITS else None  # what sqlgpt quantize stores
        # as a loaded model keeps one
        decoder = Decoder(model, precision, slots=BATCH, quantized=blocks, group=DEFAULT_GROUP)
        setup_s[precision] = time.perf_counter() - start
        matrix_bytes[precision] = (sum(q.nbytes + sc.nbytes for q, sc in blocks.values())
                                   if blocks else decoder.panels.nbytes)
        name = "sqlgpt" if precision == "fp32" else f"sqlgpt_{precision}"
        runs[name] = functools.partial(lambda d: list(generate_ids(d, prompt, n_new, 0)), decoder)
        runs[f"{name}_batch"] = functools.partial(batch_greedy, decoder, prompts, n_new)
    if torch_model is not None:
        runs["torch"] = lambda: torch_model.generate_greedy(prompt, n_new)
        runs["torch_batch"] = lambda: torch_model.generate_greedy(prompts, n_new)
    # the decode phase alone: the steps after the prompt's (the first yields
    # one token per sequence)
    from sqlgpt.inference.sampling import Sampler
    from sqlgpt.inference.generate import generate_batch
    fp32 = Decoder(model, "fp32", slots=BATCH)
    phases = {
        "sqlgpt": lambda: decode_phase_rate(lambda: generate_ids(fp32, prompt, n_new, 0), 1),
        "sqlgpt_batch": lambda: decode_phase_rate(
            lambda: generate_batch(fp32, prompts, n_new, Sampler(temperature=0)), BATCH)}
    # one sequence and the batch in turn, round after round, as their ratio is the figure
    measured = interleaved({**{name: functools.partial(elapsed, fn) for name, fn in runs.items()},
                            **{f"phase_{name}": fn for name, fn in phases.items()}}, repeats)
    result = {"tokens_per_s": {name: n_new * (BATCH if name.endswith("_batch") else 1)
                               / measured[name] for name in runs},
              "decode_tokens_per_s": {name: measured[f"phase_{name}"] for name in phases},
              "prompt_tokens": n_prompt, "new_tokens": n_new, "decoder_setup_s": setup_s,
              "batch": BATCH, "matrix_mb": {p: b / 1e6 for p, b in matrix_bytes.items()}}
    tokens = {name: fn() for name, fn in runs.items()}
    result["batch_tokens_match"] = tokens["sqlgpt_batch"][0] == tokens["sqlgpt"]
    # how many greedy tokens bf16 decoding shares with float32 before they part
    result["same_tokens"] = {p: next((i for i, (a, b) in enumerate(
        zip(tokens["sqlgpt"], tokens[f"sqlgpt_{p}"])) if a != b), n_new)
        for p in PRECISIONS if p != "fp32"}
    if torch_model is not None:
        result["greedy_tokens_match"] = tokens["sqlgpt"] == tokens["torch"]
    return result


def loss_check(model, torch_model, arch):
    """Both models with the same weights on the same batch, eval mode: the
    losses must agree, or the comparison is not between the same model."""
    x, y = random_batch(arch)
    ours = model.forward(x, y)
    with torch.inference_mode():
        theirs = torch_model(torch.from_numpy(x).long(), torch.from_numpy(y).long()).item()
    return {"sqlgpt": ours, "torch": theirs, "rel_diff": abs(ours - theirs) / abs(theirs)}


# ---- checkpoints ----
def checkpoint_arrays(model):
    """Everything sqlgpt stores per parameter (weights and both Adam moments)."""
    return {f"{t.name}.{buf}": getattr(t, buf) for t in model.params for buf in ("data", "m", "v")}


def fill_model(model, arrays):
    """Loading ends with the weights in the model, as sqlgpt's read_weights does."""
    for t in model.params:
        for buf in ("data", "m", "v"):
            getattr(t, buf)[...] = arrays[f"{t.name}.{buf}"]


def read_npz(path):
    with np.load(path) as f:  # lazy: reading a member is what loads it
        return {name: f[name] for name in f.files}


def sqlgpt_checkpoint_io(model, directory, repeats):
    """Save: one checkpoint transaction on the open database, as training does.
    Load: open the file and read every weight, as resuming does."""
    from sqlgpt import store
    from sqlgpt.data.tokenizers import WordTokenizer
    path = directory / "model.db"
    state = {"step": 1, "elapsed_s": 0.0}
    from sqlgpt.model.config import TrainConfig
    train_cfg = TrainConfig(vocab_size=model.arch.n_vocab - 2)
    tokenizer = WordTokenizer(f"w{i}" for i in range(train_cfg.vocab_size))
    conn, lock = store.create_database(path, model, train_cfg, tokenizer, state)
    save_s = median_time(lambda: store.save_checkpoint(conn, model, train_cfg, state, None, None),
                         repeats)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # size at rest, not a WAL copy beside it
    conn.close()
    lock.release()
    size = path.stat().st_size

    def load():
        conn = store.open_database(path)
        store.read_weights(conn, model)
        conn.close()
    return save_s, median_time(load, repeats), size


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_checkpoint_io(model, path, save, read, repeats):
    """The same tensors through a plain file format: save, then read into the
    model. Saves are fsync'd: sqlgpt commits each checkpoint with
    synchronous = FULL, and a checkpoint is one only once it is on disk."""
    arrays = checkpoint_arrays(model)

    def durable_save():
        save(arrays, path)
        fsync_file(path)
    save_s = median_time(durable_save, repeats)
    load_s = median_time(lambda: fill_model(model, read(path)), repeats)
    return save_s, load_s, path.stat().st_size


def compare_checkpoints(model, repeats):
    """Seconds to save (durably) and load, and bytes on disk: sqlgpt's SQLite
    vs safetensors and np.savez of the same data, m and v arrays. Loads read
    from a warm page cache."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        formats = {"sqlgpt": lambda: sqlgpt_checkpoint_io(model, tmp, repeats),
                   "npz": lambda: file_checkpoint_io(model, tmp / "model.npz",
                                                     lambda a, p: np.savez(p, **a), read_npz,
                                                     repeats)}
        if save_file is not None:
            formats["safetensors"] = lambda: file_checkpoint_io(
                model, tmp / "model.safetensors", save_file, load_file, repeats)
        measured = {name: run() for name, run in formats.items()}
    return {key: {name: m[i] for name, m in measured.items()}
            for i, key in enumerate(("save_s", "load_s", "bytes"))}


# ---- one config ----
def bench_config(arch, args, peak_flops):
    from sqlgpt.model.model import GPT
    repeats = 3 if args.tiny else 5
    model = GPT(architecture(arch))
    model.init_weights(np.random.default_rng(0))
    torch_model = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        torch_model = build(arch).eval()
        torch_model.load_sqlgpt_weights({t.name: t.data for t in model.params})
        assert sum(p.numel() for p in torch_model.parameters()) == model.params.size
    result = {"arch": arch, "params": model.params.size, "flops_per_token": flops_per_token(arch)}
    if torch_model is not None:
        result["loss_check"] = loss_check(model, torch_model, arch)
    result["generate"] = compare_generation(model, torch_model, arch, repeats)
    result["checkpoint"] = compare_checkpoints(model, repeats)
    del model, torch_model
    compile_too = args.compile if args.compile is not None else not args.tiny
    sides = ["sqlgpt", "torch"] + (["torch_compile"] if compile_too else [])
    if arch["name"] in GENERATE_ONLY or args.generate_only:
        sides = []
    result["train"] = {side: train_in_child(side, arch, args) for side in sides}
    for run in result["train"].values():
        if "tokens_per_s" in run:
            run["mfu"] = run["tokens_per_s"] * result["flops_per_token"] / peak_flops
    return result


def sweep(base, args):
    """Training tokens/s and peak RSS as context and width grow (tokens per step fixed)."""
    sizes = TINY_SWEEP if args.tiny else SWEEP
    tokens = base["batch_size"] * base["seq_len"]
    points = [dict(base, seq_len=T, batch_size=max(1, tokens // T)) for T in sizes["seq_lens"]]
    points += [dict(base, embed_dim=C, num_heads=max(1, C // HEAD_WIDTH))
               for C in sizes["widths"] if C != base["embed_dim"]]
    return [{"arch": arch, "train": {side: train_in_child(side, arch, args)
                                     for side in ("sqlgpt", "torch")}} for arch in points]


# ---- reporting ----
def fmt(value, spec):
    return "n/a" if value is None else spec.format(value)


def ratio(ours, theirs):
    return "n/a" if ours is None or not theirs else f"{ours / theirs:.2f}x"


def config_rows(r):
    """metric | sqlgpt | PyTorch eager (or file format) | torch.compile | ratio."""
    train = {side: r["train"].get(side, {}) for side in ("sqlgpt", "torch", "torch_compile")}
    compiled = "torch_compile" in r["train"]
    gen, ckpt = r["generate"]["tokens_per_s"], r["checkpoint"]
    specs = [  # (label, sqlgpt value, baseline value, compile value or "-", format)
        ("train tokens/s", *(train[s].get("tokens_per_s") for s in train), "{:,.0f}"),
        ("MFU", *(train[s].get("mfu") for s in train), "{:.1%}"),
        ("generate tokens/s", gen["sqlgpt"], gen.get("torch"), "-", "{:,.0f}"),
        *((f"generate tokens/s, {p}", gen[f"sqlgpt_{p}"], gen.get("torch"), "-", "{:,.0f}")
          for p in ("bf16", "int8", "int4")),
        (f"generate tokens/s, batch {r['generate']['batch']}", gen["sqlgpt_batch"],
         gen.get("torch_batch"), "-", "{:,.0f}"),
        *((f"generate tokens/s, batch {r['generate']['batch']}, {p}", gen[f"sqlgpt_{p}_batch"],
           gen.get("torch_batch"), "-", "{:,.0f}") for p in ("bf16", "int8", "int4")),
        *((f"decode matrices MB, {p}", r["generate"]["matrix_mb"][p], None, "-", "{:.1f}")
          for p in ("fp32", "bf16", "int8", "int4")),
        ("peak RSS MB (training)", *(train[s].get("peak_rss_mb") for s in train), "{:,.0f}"),
        ("RSS MB before the model", *(train[s].get("start_rss_mb") for s in train), "{:,.0f}"),
    ]
    for other in ("safetensors", "npz"):
        for key, label, spec in (("save_s", "save s", "{:.4f}"), ("load_s", "load s", "{:.4f}"),
                                 ("bytes", "MB on disk", "{:.1f}")):
            scale = 1e-6 if key == "bytes" else 1
            ours, theirs = (ckpt[key].get(n) for n in ("sqlgpt", other))
            specs.append((f"{label} vs {other}", ours * scale,
                          None if theirs is None else theirs * scale, "-", spec))
    rows = []
    for label, ours, theirs, comp, spec in specs:
        comp_cell = "-" if comp == "-" else fmt(comp, spec) if compiled else "skipped"
        rows.append([label, fmt(ours, spec), fmt(theirs, spec), comp_cell, ratio(ours, theirs)])
    return rows


def sweep_rows(points):
    rows = []
    for p in points:
        a, ours, theirs = p["arch"], p["train"]["sqlgpt"], p["train"]["torch"]
        speed = [run.get("tokens_per_s") for run in (ours, theirs)]
        rss = [run.get("peak_rss_mb") for run in (ours, theirs)]
        rows.append([str(a[k]) for k in ("seq_len", "batch_size", "embed_dim", "num_heads")]
                    + [fmt(v, "{:,.0f}") for v in speed] + [ratio(*speed)]
                    + [fmt(v, "{:,.0f}") for v in rss])
    return rows


def notes(name, r):
    """The lines under a config's table: what was compared and what went wrong."""
    a, gen = r["arch"], r["generate"]
    kv = f" ({a['kv_heads']} kv)" if a.get("kv_heads") else ""
    lines = [f"{name}: {a['preset']} preset, {a['num_layers']} layers, width {a['embed_dim']}, "
             f"{a['num_heads']} heads{kv}, seq {a['seq_len']}, batch {a['batch_size']}, "
             f"{a['n_vocab']} tokens, {r['params']:,} parameters, "
             f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token"
             + (" (generation only)" if a["name"] in GENERATE_ONLY else "")]
    speed, decode = gen["tokens_per_s"], gen["decode_tokens_per_s"]
    lines.append(f"  batch of {gen['batch']}: {speed['sqlgpt_batch'] / speed['sqlgpt']:.1f}x the "
                 f"single stream's tokens/s (bf16 "
                 f"{speed['sqlgpt_bf16_batch'] / speed['sqlgpt_bf16']:.1f}x); after the prompt, "
                 f"{decode['sqlgpt_batch']:,.0f} against {decode['sqlgpt']:,.0f} tokens/s "
                 f"({decode['sqlgpt_batch'] / decode['sqlgpt']:.1f}x); its first sequence gave "
                 f"the single stream's tokens: {'yes' if gen['batch_tokens_match'] else 'no'}")
    if "loss_check" in r:
        c = r["loss_check"]
        lines.append(f"  same weights, eval loss: sqlgpt {c['sqlgpt']:.6f}, "
                     f"PyTorch {c['torch']:.6f} (rel diff {c['rel_diff']:.1e}); "
                     f"greedy tokens identical: "
                     f"{'yes' if gen.get('greedy_tokens_match') else 'no'}")
    lines.append(f"  generation: {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} greedy "
                 f"tokens; sqlgpt via generate_ids (one C decode_step per token, KV cache; "
                 f"weights packed once per model: "
                 + ", ".join(f"{s * 1e3:.1f} ms {p}" for p, s in gen["decoder_setup_s"].items())
                 + " (int8, int4: quantizing included)); greedy tokens shared with fp32's: "
                 + ", ".join(f"{p} {n} of {gen['new_tokens']}" for p, n in gen["same_tokens"].items())
                 + (", PyTorch with a KV cache" if "torch" in gen["tokens_per_s"] else ""))
    lines += [f"  {side}: {run['error']}" for side, run in r["train"].items() if "error" in run]
    return lines


CONFIG_HEADER = ["metric", "sqlgpt", "PyTorch eager / file", "torch.compile", "sqlgpt/PyTorch"]
SWEEP_HEADER = ["seq", "batch", "width", "heads", "sqlgpt tok/s", "PyTorch tok/s",
                "sqlgpt/PyTorch", "sqlgpt RSS MB", "PyTorch RSS MB"]


def report(results, markdown):
    m, peak = results["machine"], results["peak"]
    out = [f"CPU: {m['cpu']}; {m['usable_cores']} usable of {m['logical_cores']} logical cores; "
           f"{m['threads']} threads; Python {m['python']}, numpy {m['numpy']}, "
           f"torch {m['torch'] or 'not installed'}",
           f"float32 matmul peak ({peak['n']}x{peak['n']}): {peak['flops'] / 1e9:.1f} GFLOP/s "
           f"(" + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak["by_library"].items()) + ")",
           "ratio = sqlgpt / PyTorch: above 1 is better for tokens/s and MFU, worse for s, MB; "
           "n/a = failed or not installed, skipped = not run (--tiny, --no-compile), "
           "- = does not apply",
           ""]
    if markdown:  # a list, so the lines do not run together into one paragraph
        out = [f"- {line}" for line in out[:-1]] + [""]
    for name, r in results["configs"].items():
        lines = notes(name, r)
        if markdown:
            lines = [f"**{lines[0]}**", ""] + [f"- {line.strip()}" for line in lines[1:]] + [""]
        out += lines + [render(CONFIG_HEADER, config_rows(r), markdown), ""]
    if results.get("sweep"):
        out += ["scaling sweep (lua architecture, tokens per step fixed):", "",
                render(SWEEP_HEADER, sweep_rows(results["sweep"]), markdown), ""]
    return "\n".join(out)


def main(args):
    if args.child:
        return child_main(args.child, args.arch, args.threads, args.steps)
    if args.mpi:
        import mpi_bench
        given = ["--steps", str(args.steps)] + (["--tiny"] if args.tiny else []) + \
            (["--markdown"] if args.markdown else []) + \
            (["--out", str(args.out)] if args.out else []) + \
            (["--configs", args.configs] if "--configs" in sys.argv else [])
        return mpi_bench.main(mpi_bench.parse_args(given))
    if args.extension:
        import extension_bench
        given = (["--tiny"] if args.tiny else []) + (["--markdown"] if args.markdown else []) + \
            (["--out", str(args.out)] if args.out else []) + \
            (["--configs", args.configs] if "--configs" in sys.argv else [])
        return extension_bench.main(extension_bench.parse_args(given))
    tiny = {"tiny": TINY, "tiny-llama": TINY_LLAMA}
    names = list(tiny) if args.tiny else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS and n not in tiny]
    if unknown:
        sys.exit(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    archs = {n: resolved({**CONFIGS, **tiny}[n], n) for n in names}
    results = {"machine": machine_info(args.threads),
               "peak": matmul_peak(args.threads, 512 if args.tiny else 2048, 3 if args.tiny else 5)}
    results["configs"] = {n: bench_config(a, args, results["peak"]["flops"])
                          for n, a in archs.items()}
    if args.sweep:
        results["sweep"] = sweep(resolved(TINY if args.tiny else CONFIGS["lua"], "sweep"), args)
    print(report(results, markdown=False))
    if args.markdown:
        print(report(results, markdown=True))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(parse_args())
