"""The C decode step alone, for 1, 2, 4, 8 and 16 rows: what a batch costs
the kernel, without Python's sampling around it.

    python benchmarks/decode_steps.py [--configs small,gpt2-small] [--rounds 5]

Each config's rows are sequences at positions 16 to 79 (one token each, in
slots of their own, after a 16-token prompt; shorter where the context is),
timed over those 64 steps.
Every row count runs once a round, in turn, and each figure is the median
over the rounds, so that the machine's drift falls on all of them alike.
Reported per row count: ms per step, tokens/s, the rate against one row's,
the weight matrices' bytes streamed per second, and the matrix arithmetic
done per second (2 x rows x matrix weights a step; attention not counted).
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CONFIGS, architecture  # noqa: E402
from tables import per_config_main  # noqa: E402

ROWS = (1, 2, 4, 8, 16)
PROMPT, STEPS = 16, 64


def step_time(decoder, n):
    """Seconds per step of n rows, one per slot, over up to STEPS positions."""
    prompt = min(PROMPT, decoder.arch.seq_len // 4)
    steps = min(STEPS, decoder.arch.seq_len - prompt)
    for slot in range(n):
        decoder.run([slot] * prompt, list(range(1, prompt + 1)), range(prompt), [prompt - 1])
    slots, tokens = list(range(n)), [5] * n
    start = time.perf_counter()
    for pos in range(prompt, prompt + steps):
        decoder.run(slots, tokens, [pos] * n, slots)
    return (time.perf_counter() - start) / steps


def measure(name, rounds):
    from sqlgpt.inference.decoder import Decoder
    from sqlgpt.model.model import GPT
    model = GPT(architecture(CONFIGS[name]))
    model.init_weights(np.random.default_rng(0))
    decoder = Decoder(model, "fp32", slots=max(ROWS))
    weights = sum(t.data.size for t in model.params if t.data.ndim == 2
                  and t.name not in ("wte", "wpe"))
    weights += 0 if "head" in {t.name for t in model.params} else model.arch.n_vocab * \
        model.arch.embed_dim  # a tied head reads wte once more
    times = {n: [] for n in ROWS}
    for round_ in range(rounds + 1):  # the first round warms up
        for n in ROWS:
            elapsed = step_time(decoder, n)
            if round_:
                times[n].append(elapsed)
    rows = []
    for n in ROWS:
        t = statistics.median(times[n])
        one = statistics.median(times[1])
        rows.append([name, str(n), f"{t * 1e3:.3f}", f"{n / t:,.0f}", f"{n * one / t:.2f}x",
                     f"{4 * weights / t / 1e9:.1f}", f"{2 * n * weights / t / 1e9:.1f}"])
    return rows


def main(argv=None):
    per_config_main(argv, __doc__, measure, ["config", "rows", "ms/step", "tokens/s",
                                             "against 1 row", "matrix GB/s", "matrix GFLOP/s"],
                    "small,gpt2-small,llama-small,stories15M", 5)


if __name__ == "__main__":
    main()
