"""Where a training step's time goes: the whole-model forward, its backward,
zeroing the gradients and the Adam update, each one kernel call, timed over
a few steps. (The split inside forward and backward is perf's job:
`perf record -g python benchmarks/profile_step.py lua`.)

    python benchmarks/profile_step.py [a config of bench.py: lua, baby, llama-small, ...]
"""
import collections
import sys
import time

import numpy as np

from bench import CONFIGS, DROPOUT, LR, architecture
from sqlgpt.model.model import GPT

STEPS = 3


def main(name):
    arch, B = architecture(CONFIGS[name]), CONFIGS[name]["batch_size"]
    model = GPT(arch)
    model.init_weights(np.random.default_rng(0))
    x = np.random.default_rng(1).integers(1, arch.n_vocab, (B, arch.seq_len)).astype(np.int32)
    phases = {"zero_grad": lambda step: model.params.zero_grad(),
              "forward": lambda step: model.forward(x, x, dropout=DROPOUT, dropout_seed=step),
              "backward": lambda step: model.backward(),
              "adam": lambda step: model.optimizer_step(step + 1, LR)}
    times = collections.Counter()
    for step in range(STEPS + 1):  # the first step allocates buffers: not timed
        for phase, run in phases.items():
            t0 = time.perf_counter()
            run(step)
            if step:
                times[phase] += time.perf_counter() - t0
    step_s = sum(times.values()) / STEPS
    print(f"{name}: {step_s * 1000:.0f} ms per step, {x.size / step_s:,.0f} tokens/s")
    for phase, seconds in times.most_common():
        print(f"  {phase:12s} {seconds / STEPS * 1000:8.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lua")
