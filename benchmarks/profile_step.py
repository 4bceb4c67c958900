"""Where a training step's time goes: every kernel call of a few sqlgpt
training steps timed by name, plus what is left (Python and numpy).

    python benchmarks/profile_step.py [lua|baby|small]
"""
import collections
import sys
import time

import numpy as np

import sqlgpt.model as model_module
from sqlgpt.model import GPT, Config

CONFIGS = {"lua": {},
           "baby": dict(vocab_size=63, num_heads=4, num_layers=4, seq_len=64, batch_size=12),
           "small": dict(embed_dim=384, num_heads=6, seq_len=256, batch_size=8)}
STEPS = 3


class TimedKernel:
    """Stands in for the kernel library and adds each call's time to a counter."""

    def __init__(self, lib, times):
        self.lib, self.times = lib, times

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def timed(*args):
            t0 = time.perf_counter()
            result = fn(*args)
            self.times[name] += time.perf_counter() - t0
            return result
        return timed


def main(name):
    cfg = Config(**CONFIGS[name])
    times = collections.Counter()
    model_module.lib = TimedKernel(model_module.lib, times)
    model = GPT(cfg)
    model.init_weights(np.random.default_rng(0))
    x = np.random.default_rng(1).integers(1, cfg.n_classes, (cfg.batch_size, cfg.seq_len))
    x = x.astype(np.int32)
    for step in range(STEPS + 1):  # the first step allocates buffers: not timed
        if step == 1:
            times.clear()
            t0 = time.perf_counter()
        model.params.zero_grad()
        model.forward(x, x, dropout_seed=step)
        model.backward()
        model.adam_step(step + 1, cfg.lr)
    step_s = (time.perf_counter() - t0) / STEPS
    print(f"{name}: {step_s * 1000:.0f} ms per step, {x.size / step_s:,.0f} tokens/s")
    for op, seconds in times.most_common():
        print(f"  {op:24s} {seconds / STEPS * 1000:8.1f} ms")
    print(f"  {'python and numpy':24s} {(step_s - sum(times.values()) / STEPS) * 1000:8.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lua")
