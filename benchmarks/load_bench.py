"""Throughput on a shared machine: generation and training tokens/s while
other processes keep the cores busy, in one run.

    python benchmarks/load_bench.py [--config small] [--loads 0,1,2] [--markdown]

A load of L puts L spinning processes per usable core beside the measured
one (Python busy loops, as a build or another service would be). At each
load, each side runs in a fresh child process:
- sqlgpt at its default threads (for generation the kernel's governor
  picks the count step by step; training keeps every core, its sums
  depending on the count), and fixed at 1 thread and at every core;
- PyTorch (the same model written as PyTorch, benchmarks/torch_gpt.py) at
  its default threads and at 1 thread.
Generation is greedy decoding of NEW_TOKENS after a PROMPT_TOKENS prompt
(KV caches on both sides), repeated for at least MIN_SECONDS; training is the full step (forward, backward,
Adam) on one batch of the config. Each figure is tokens/s over the whole
run (every step counted, none dropped as warm-up, since a busy machine has
no steady state), the median of --rounds runs.

The goal it checks: at every load, sqlgpt's default at least matches its
best fixed thread count, and never falls below its fair share of the quiet
throughput: quiet x cores left to it / cores, where the cores left to it
are its even share as one of the load x cores + 1 processes that want them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import CONFIGS, architecture, resolved  # noqa: E402
from tables import render  # noqa: E402

PROMPT_TOKENS = 16
NEW_TOKENS = 200
TRAIN_STEPS = 6
MIN_SECONDS = 2.0  # generation repeats until this long
SPIN = "while True: pass"


def repeated(generate):
    """Tokens/s of generate() (which returns the tokens it made), run again
    until MIN_SECONDS have passed."""
    start, made = time.perf_counter(), 0
    while not made or time.perf_counter() - start < MIN_SECONDS:
        made += generate()
    return made / (time.perf_counter() - start)


def sqlgpt_generation(config, threads):
    import sqlgpt
    from sqlgpt.inference.decoder import Decoder
    from sqlgpt.inference.generate import generate_ids
    from sqlgpt.model.model import GPT
    if threads != "default":
        sqlgpt.set_threads(int(threads))
    model = GPT(architecture(config))
    model.init_weights(np.random.default_rng(0))
    decoder = Decoder(model, "fp32")
    prompt = list(range(1, PROMPT_TOKENS + 1))
    return repeated(lambda: len(list(generate_ids(decoder, prompt, NEW_TOKENS, 0))))


def sqlgpt_training(config, threads):
    import sqlgpt
    from bench import random_batch, sqlgpt_train_step
    if threads != "default":
        sqlgpt.set_threads(int(threads))
    arch = resolved(config, "load")
    x, y = random_batch(arch)
    step = sqlgpt_train_step(arch, x, y)
    start = time.perf_counter()
    for i in range(1, TRAIN_STEPS + 1):
        step(i)
    return x.size * TRAIN_STEPS / (time.perf_counter() - start)


def torch_generation(config, threads):
    import torch
    from torch_gpt import build
    if threads != "default":
        torch.set_num_threads(int(threads))
    model = build(resolved(config, "load")).eval()
    prompt = list(range(1, PROMPT_TOKENS + 1))
    return repeated(lambda: len(model.generate_greedy(prompt, NEW_TOKENS)))


def torch_training(config, threads):
    import torch
    from bench import random_batch, torch_train_step
    if threads != "default":
        torch.set_num_threads(int(threads))
    arch = resolved(config, "load")
    x, y = random_batch(arch)
    step = torch_train_step(arch, x, y, compiled=False)
    start = time.perf_counter()
    for i in range(1, TRAIN_STEPS + 1):
        step(i)
    return x.size * TRAIN_STEPS / (time.perf_counter() - start)


RUNS = {("generation", "sqlgpt"): sqlgpt_generation, ("training", "sqlgpt"): sqlgpt_training,
        ("generation", "torch"): torch_generation, ("training", "torch"): torch_training}


def child(argv):
    task, side, config, threads = argv
    print(json.dumps(RUNS[task, side](CONFIGS[config], threads)))


def measure(task, side, config, threads):
    out = subprocess.run([sys.executable, __file__, "--child", task, side, config, threads],
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Busy:
    """n spinning processes for the length of a with block."""

    def __init__(self, n):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)  # let them reach the cores
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def fair_share(quiet, load, cores):
    """The quiet throughput scaled to this process's share of the cores
    when they are split evenly among it and the load * cores busy ones."""
    return quiet * (cores / (load * cores + 1)) / cores


def sides(cores):
    fixed = sorted({1, cores})
    return ([("sqlgpt", "default")] + [("sqlgpt", str(n)) for n in fixed] +
            [("torch", "default"), ("torch", "1")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--loads", default="0,1,2", help="busy processes per core, comma-separated")
    p.add_argument("--tasks", default="generation,training")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    from sqlgpt.model.cpus import usable_cpus
    cores = usable_cpus()
    loads = [int(x) for x in args.loads.split(",")]
    header = ["task", "side", "threads"] + [f"load {n}" for n in loads]
    rows, quiet = [], {}
    for task in args.tasks.split(","):
        figures = {}
        for load in loads:
            with Busy(load * cores):
                for side, threads in sides(cores):
                    figures[side, threads, load] = statistics.median(
                        measure(task, side, args.config, threads) for _ in range(args.rounds))
        for side, threads in sides(cores):
            rows.append([task, side, threads] +
                        [f"{figures[side, threads, load]:.0f}" for load in loads])
        quiet = figures.get(("sqlgpt", "default", 0))
        if quiet:
            best = [max(v for (s, t, ld), v in figures.items() if s == "sqlgpt" and
                        t != "default" and ld == load) for load in loads]
            rows.append([task, "sqlgpt", "default / best fixed"] +
                        [f"{figures['sqlgpt', 'default', load] / b:.2f}x"
                         for load, b in zip(loads, best)])
            rows.append([task, "sqlgpt", "default / fair share"] +
                        [f"{figures['sqlgpt', 'default', load] / fair_share(quiet, load, cores):.2f}x"
                         for load in loads])
    print(f"{args.config}, {cores} usable cores, tokens/s ({os.cpu_count()} CPUs)")
    print(render(header, rows, args.markdown))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
