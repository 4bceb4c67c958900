"""What generation costs around the model: tokens/s through the API's
generate() (decode step, sampling, streaming detokenization, stop checks)
against the same steps made with the C decode step alone, in one run.

    python benchmarks/generate_overhead.py [--configs lua,baby] [--rounds 7]

For each config (random weights, a word tokenizer of the config's size), one
generation is a prompt of PROMPT tokens and then tokens to the end of the
context; the C step alone makes the same decode calls (the prompt's rows in
one step, then one row a step) with no Python between them. Greedy and
sampled (temperature 0.8, top-k 40) generation, and generate_ids (the ids
without text), run once a round each, in turn; each figure is the median
over the rounds.
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CONFIGS, architecture  # noqa: E402
from tables import per_config_main  # noqa: E402

PROMPT = 4
REPEATS = 4  # generations a round, so that short contexts time enough steps


def model_of(name):
    """An api.Model of the config with random weights and a word tokenizer."""
    from sqlgpt.api import Model
    from sqlgpt.data.tokenizers import WordTokenizer
    from sqlgpt.model.config import TrainConfig
    from sqlgpt.model.model import GPT
    gpt = GPT(architecture(CONFIGS[name]))
    gpt.init_weights(np.random.default_rng(0))
    tokenizer = WordTokenizer(f"w{i}" for i in range(gpt.arch.n_vocab - 2))
    return Model(gpt, TrainConfig(), tokenizer, 0)


def c_steps(decoder, prompt, n):
    """Seconds for the decode calls of one generation, made in a C loop's
    stead: the prompt in one step, then n - 1 single rows."""
    from sqlgpt._kernel import ffi, lib
    from sqlgpt.model.tensor import fptr
    args = (decoder.config, decoder.tensors.struct, decoder.code, decoder.group, decoder._k,
            decoder._v)
    logits = fptr(decoder.logits)
    slots0, out0 = ffi.new("int[]", [0] * len(prompt)), ffi.new("int[]", [len(prompt) - 1])
    tokens0 = ffi.new("int[]", prompt)
    positions0 = ffi.new("int[]", list(range(len(prompt))))
    slot, token, position, row = (ffi.new("int[1]") for _ in range(4))
    token[0] = 5
    start = time.perf_counter()
    lib.decode_batch(*args, len(prompt), slots0, tokens0, positions0, 1, out0, logits)
    for pos in range(len(prompt), len(prompt) + n - 1):
        position[0] = pos
        lib.decode_batch(*args, 1, slot, token, position, 1, row, logits)
    return time.perf_counter() - start


def measure(name, rounds):
    model = model_of(name)
    T = model.arch.seq_len
    n = T - PROMPT
    prompt_text = " ".join(f"w{i}" for i in range(1, PROMPT + 1))
    prompt = model.prompt_ids(prompt_text).tolist()
    decoder = model.decoder()
    runs = {
        "C step alone": lambda: c_steps(decoder, prompt, n),
        "generate(), greedy": lambda: model.generate(prompt_text, max_tokens=n, temperature=0),
        "generate(), sampled": lambda: model.generate(prompt_text, max_tokens=n, temperature=0.8,
                                                      top_k=40, seed=1),
        "generate_ids(), sampled": lambda: list(model.generate_ids(
            prompt_text, max_tokens=n, temperature=0.8, top_k=40, seed=1)),
    }
    times = {k: [] for k in runs}
    for round_ in range(rounds + 1):  # the first round warms up
        for label, run in runs.items():
            start = time.perf_counter()
            for _ in range(REPEATS):
                result = run()
            elapsed = time.perf_counter() - start
            if label != "C step alone":
                made = len(result) if isinstance(result, list) else \
                    len(model.encode(result)) - PROMPT
                assert made == n, (label, made, n)  # every token made: nothing stopped early
            if round_:
                times[label].append(elapsed)
    base = statistics.median(times["C step alone"])
    return [[name, label, f"{REPEATS * n / statistics.median(t):,.0f}",
             f"{base / statistics.median(t):.0%}"] for label, t in times.items()]


def main(argv=None):
    per_config_main(argv, __doc__, measure, ["config", "path", "tokens/s", "of the C step's"],
                    "lua,baby", 7)


if __name__ == "__main__":
    main()
