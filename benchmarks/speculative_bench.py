"""Speculative decoding on a real pair of models, against plain decoding of
the target and PyTorch's KV-cache loop on the target's weights.

    python benchmarks/speculative_bench.py [--target-db T.db --draft-db D.db]
                                           [--iters 300] [--tokens 200]

Without databases it trains both on the example corpus first (character
tokenizer, so they share it): a gpt2 target, 4 layers of width 256 (3.2M
parameters, 13 MB of float32, more than the L3 cache holds), and a draft
of 2 layers of width 64; then greedy and sampled generation of the
same prompts with and without the draft. Greedy output is checked to be
identical. Reported: tokens/s of each, the speed-up and the draft's
acceptance rate.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "tinyshakespeare.txt"
TARGET = ["--preset", "gpt2", "--tokenizer", "char", "--embed-dim", "256", "--heads", "8",
          "--layers", "4", "--seq-len", "128", "--batch-size", "16", "--lr", "2e-3"]
DRAFT = ["--preset", "gpt2", "--tokenizer", "char", "--embed-dim", "64", "--heads", "4",
         "--layers", "2", "--seq-len", "128", "--batch-size", "16", "--lr", "3e-3"]
PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY:\nMy lords,"]


def train(db, settings, iters):
    from click.testing import CliRunner
    from sqlgpt.cli import main
    result = CliRunner().invoke(main, ["train", str(CORPUS), "--db", str(db), "--iters",
                                       str(iters), "--save-every", str(iters), *settings])
    if result.exit_code:
        sys.exit(result.output)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def torch_tokens_per_s(model, prompt, tokens):
    """PyTorch's KV-cache greedy loop on the target's weights (None without torch)."""
    try:
        import torch
        from torch_gpt import build
    except ImportError:
        return None
    arch = {**model.arch.to_dict(), "name": "target", "batch_size": 1}
    torch_model = build(arch).eval()
    torch_model.load_sqlgpt_weights(model.state_dict_view())
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    ids = [int(i) for i in model.prompt_ids(prompt)]
    n = min(tokens, model.arch.seq_len - len(ids))
    _, seconds = timed(lambda: torch_model.generate_greedy(ids, n))
    return n / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target-db", type=Path)
    p.add_argument("--draft-db", type=Path)
    p.add_argument("--iters", type=int, default=300, help="training steps of each model")
    p.add_argument("--tokens", type=int, default=200, help="tokens generated per prompt")
    p.add_argument("--draft-tokens", type=int, default=4)
    args = p.parse_args(argv)
    import sqlgpt
    from sqlgpt.inference.generate import GenerationStats
    with tempfile.TemporaryDirectory() as tmp:
        target_db = args.target_db or Path(tmp) / "target.db"
        draft_db = args.draft_db or Path(tmp) / "draft.db"
        if not args.target_db:
            train(target_db, TARGET, args.iters)
        if not args.draft_db:
            train(draft_db, DRAFT, args.iters)
        target, draft = sqlgpt.load(target_db), sqlgpt.load(draft_db)
        rows = []
        for temperature in (0.0, 0.8):
            plain_s = spec_s = 0.0
            plain_n = spec_n = 0
            stats = GenerationStats()
            same = True
            for i, prompt in enumerate(PROMPTS):
                counted = GenerationStats()
                plain, seconds = timed(lambda: target.generate(
                    prompt, args.tokens, temperature, seed=i, stats=counted))
                plain_s, plain_n = plain_s + seconds, plain_n + counted.tokens
                before = stats.tokens
                spec, seconds = timed(lambda: target.generate(
                    prompt, args.tokens, temperature, seed=i, draft=draft,
                    draft_tokens=args.draft_tokens, stats=stats))
                spec_s, spec_n = spec_s + seconds, spec_n + stats.tokens - before
                same &= plain == spec
            rows.append((temperature, plain_n / plain_s, spec_n / spec_s, stats.acceptance,
                         same))
        torch_speed = torch_tokens_per_s(target, PROMPTS[0], args.tokens)
    print(f"target {target.num_parameters():,} parameters, draft {draft.num_parameters():,}; "
          f"{len(PROMPTS)} prompts x {args.tokens} tokens, {args.draft_tokens} draft tokens "
          f"per step")
    header = "| decoding | target alone tok/s | with draft tok/s | speed-up | accepted |" \
             " same text |"
    lines = [header, "|---|---|---|---|---|---|"]
    for temperature, plain, spec, acceptance, same in rows:
        kind = "greedy" if temperature == 0 else f"sampled, T={temperature}"
        lines.append(f"| {kind} | {plain:,.0f} | {spec:,.0f} | {spec / plain:.2f}x | "
                     f"{acceptance:.0%} | {'yes' if same else 'no (sampled: other draws)'} |")
    if torch_speed:
        lines.append(f"| PyTorch KV-cache loop, greedy | {torch_speed:,.0f} | | | | |")
    print("\n".join(lines))
    greedy_same = rows[0][4]
    if not greedy_same:
        sys.exit("greedy speculative output differs from the target's")


if __name__ == "__main__":
    main()
