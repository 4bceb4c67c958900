"""Data-parallel training over MPI: what the engine costs on one host, and
what scaling out would give.

    python benchmarks/mpi_bench.py [--configs lua,small,gpt2-small] [--steps 5] [--tiny]
                                   [--markdown] [--out results.json]
    (python benchmarks/bench.py --mpi ... runs this)

Per config, on this machine's C cores: training tokens/s of one process
with C threads against `mpiexec -n C` with one thread each (and with
--zero 1), every side running sqlgpt's own training step (Trainer._step:
its share of the batch, forward, backward, the gradient sum, Adam), with
the time each rank spends in MPI calls and the bytes all-reduced per step.

Then a model on paper for N ranks, each a machine like this one running
the config's batch (the global batch is N times it): compute time per step
is this machine's measured step time; the gradient sum is a ring
all-reduce, 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency, at 1, 10
and 100 Gbit/s. Efficiency = compute / (compute + all-reduce), as sqlgpt
runs (the sum follows the backward pass), beside the bound an all-reduce
overlapped with the backward pass could reach, compute / max(compute,
all-reduce). A 100M-parameter config, too slow to train here, is modeled
from the FLOP rate measured on the largest config run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RANKS = (2, 8, 64)
LINKS_GBIT = (1, 10, 100)
LATENCY_S = {1: 50e-6, 10: 10e-6, 100: 2e-6}  # per message: Ethernet, 10G Ethernet, InfiniBand
# a GPT-2-like model of about 100M parameters (12 x 768, 16,384 tokens, context 512)
MODEL_100M = dict(preset="gpt2", n_vocab=16384, embed_dim=768, num_heads=12, num_layers=12,
                  seq_len=512, batch_size=8)
WARMUP_STEPS = 2
TOKENS = 200_000   # random token ids the child trains on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="lua,small,gpt2-small",
                   help="comma-separated configs of benchmarks/bench.py")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for CI")
    p.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    p.add_argument("--out", type=Path, help="write every result as JSON here")
    p.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one side (in its own processes) ----
def child_main(spec):
    """Train spec's model for warm-up + spec["steps"] steps on this World;
    rank 0 prints {step_s, mpi_s, grad_bytes} as one JSON line."""
    from sqlgpt.train import distributed
    from sqlgpt.model.arch import ArchConfig
    from sqlgpt.model.config import TrainConfig
    from sqlgpt.model.model import GPT
    from sqlgpt.train.trainer import Trainer
    world = distributed.world(spec["zero"])
    arch = ArchConfig.from_dict(spec["arch"])
    cfg = TrainConfig(batch_size=spec["batch_size"], dropout=0.1, grad_clip=1.0)
    trainer = None
    if world.is_root:
        model = GPT(arch)
        rng = np.random.default_rng(0)
        model.init_weights(rng)
        tokens = np.random.default_rng(1).integers(0, arch.n_vocab, TOKENS).astype(np.uint16)
        state = {"step": 0, "rng": rng.bit_generator.state, "bad_steps": 0, "tokens_seen": 0,
                 "elapsed_s": 0.0}
        trainer = Trainer(None, None, model, cfg, None, tokens, tokens[:0], state)
    trainer = Trainer.spread(world, trainer)
    in_mpi = [0.0]
    for name in ("sum_", "scatter_sum", "gather_shards", "agree"):
        setattr(world, name, timed(getattr(world, name), in_mpi))
    for step in range(1, WARMUP_STEPS + 1):
        trainer._step(step, 0)
    world.agree(np.zeros(1))  # start the timed steps together
    in_mpi[0], start = 0.0, time.perf_counter()
    for step in range(WARMUP_STEPS + 1, WARMUP_STEPS + spec["steps"] + 1):
        trainer._step(step, 0)
    elapsed = time.perf_counter() - start
    if world.is_root:
        print(json.dumps({"step_s": elapsed / spec["steps"], "mpi_s": in_mpi[0] / spec["steps"],
                          "grad_bytes": trainer.model.params.arenas["grad"].nbytes}))


def timed(fn, total):
    def call(*args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            total[0] += time.perf_counter() - start
    return call


def run_side(arch, batch_size, steps, ranks, zero=0):
    """One side's figures: `ranks` processes of cores/ranks threads each."""
    cores = len(os.sched_getaffinity(0))
    spec = {"arch": arch, "batch_size": batch_size, "steps": steps, "zero": zero}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if ranks > 1:
        command = [mpiexec(), "-n", str(ranks), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)),
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800,
                          cwd=tempfile.gettempdir())  # not a source folder's sqlgpt
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = batch_size * arch["seq_len"] / result["step_s"]
    return result


def mpiexec():
    found = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                          os.environ.get("PATH", "")]))
    if not found:
        raise SystemExit("no mpiexec: pip install mpi4py mpich (or install Open MPI)")
    return found


# ---- the model on paper ----
def allreduce_s(grad_bytes, ranks, gbit):
    """A ring all-reduce of grad_bytes over ranks on links of gbit Gbit/s."""
    return (2 * (ranks - 1) / ranks * grad_bytes * 8 / (gbit * 1e9)
            + 2 * (ranks - 1) * LATENCY_S[gbit])


def scaling(compute_s, grad_bytes):
    """{ranks: {gbit: (efficiency as run, bound with overlap)}}."""
    table = {}
    for ranks in RANKS:
        table[ranks] = {}
        for gbit in LINKS_GBIT:
            comm = allreduce_s(grad_bytes, ranks, gbit)
            table[ranks][gbit] = (compute_s / (compute_s + comm), compute_s / max(compute_s, comm))
    return table


def bench(name, config, args, bench_module):
    arch = bench_module.resolved(config, name)
    arch.pop("name"), arch.pop("dropout")
    batch = arch.pop("batch_size")
    cores = len(os.sched_getaffinity(0))
    ranks = max(2, cores)  # one rank per core (two on a one-core machine)
    sides = {f"1 x {cores} threads": run_side(arch, batch, args.steps, 1),
             f"{ranks} ranks x 1": run_side(arch, batch, args.steps, ranks),
             f"{ranks} ranks x 1, --zero 1": run_side(arch, batch, args.steps, ranks, zero=1)}
    single = sides[f"1 x {cores} threads"]
    flops = bench_module.flops_per_token(config) * batch * arch["seq_len"]
    return {"sides": sides, "grad_bytes": single["grad_bytes"], "flops_per_step": flops,
            "flop_rate": flops / single["step_s"],
            "scaling": scaling(single["step_s"], single["grad_bytes"])}


def modeled_100m(results, bench_module):
    """The 100M config at the FLOP rate of the largest config measured."""
    from sqlgpt.model.arch import stored_tensors
    largest = max(results.values(), key=lambda r: r["flops_per_step"])
    arch = bench_module.architecture(MODEL_100M)
    params = sum(int(np.prod(s.shape)) for s in stored_tensors(arch))
    flops = bench_module.flops_per_token(MODEL_100M) * MODEL_100M["batch_size"] * arch.seq_len
    compute = flops / largest["flop_rate"]
    grad_bytes = 4 * params
    return {"params": params, "grad_bytes": grad_bytes, "step_s": compute,
            "scaling": scaling(compute, grad_bytes)}


def report(results, model_100m, markdown):
    from tables import render
    out = []
    header = ["config", "side", "tokens/s", "vs 1 process", "in MPI / step", "all-reduced / step"]
    rows = []
    for name, r in results.items():
        base = next(iter(r["sides"].values()))["tokens_per_s"]
        for side, s in r["sides"].items():
            rows.append([name, side, f"{s['tokens_per_s']:,.0f}", f"{s['tokens_per_s'] / base:.2f}x",
                         f"{1e3 * s['mpi_s']:.1f} of {1e3 * s['step_s']:.1f} ms",
                         f"{r['grad_bytes'] / 1e6:.1f} MB"])
    out += [render(header, rows, markdown), ""]
    header = ["config", "step (1 machine)", "MB / step", "link"] + [f"{n} ranks" for n in RANKS]
    rows = []
    everything = {**{n: {"step_s": r["sides"][next(iter(r["sides"]))]["step_s"],
                         "grad_bytes": r["grad_bytes"], "scaling": r["scaling"]}
                     for n, r in results.items()}, "100M (modeled)": model_100m}
    for name, r in everything.items():
        for g in LINKS_GBIT:
            rows.append([name, f"{r['step_s']:.2f} s", f"{r['grad_bytes'] / 1e6:.0f}",
                         f"{g} Gbit/s"] + [f"{100 * r['scaling'][n][g][0]:.0f}% "
                                           f"({100 * r['scaling'][n][g][1]:.0f}%)"
                                           for n in RANKS])
    out += ["efficiency as run (with overlap, the bound):", "", render(header, rows, markdown)]
    return "\n".join(out)


def main(args):
    if args.child:
        return child_main(args.child)
    sys.path.insert(0, str(HERE))
    import bench as bench_module
    configs = ({"tiny": bench_module.TINY} if args.tiny else
               {n: bench_module.CONFIGS[n] for n in args.configs.split(",")})
    results = {n: bench(n, c, args, bench_module) for n, c in configs.items()}
    model_100m = modeled_100m(results, bench_module)
    print(report(results, model_100m, markdown=False))
    if args.markdown:
        print(report(results, model_100m, markdown=True))
    if args.out:
        args.out.write_text(json.dumps({"configs": results, "100M": model_100m}, indent=2,
                                       default=str))


if __name__ == "__main__":
    main(parse_args())
