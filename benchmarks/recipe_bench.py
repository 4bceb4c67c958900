"""Learning quality, side by side: nanoGPT's CPU recipe for Tiny Shakespeare
trained by sqlgpt and by PyTorch with nanoGPT's model, on the same token
ids, then both scored on the same held-out split the same way.

    python benchmarks/recipe_bench.py [--corpus FILE] [--iters 2000] [--eval-every 250]
        [--png docs/recipe.png]

The recipe (nanoGPT's config/train_shakespeare_char.py, CPU settings): the
gpt2 preset with the char tokenizer, 4 layers, 4 heads, 128 wide, block 64,
batch 12, lr 1e-3 cosine to 1e-4 over the run after 100 warm-up steps, AdamW
(weight decay 0.1 on matrices and embeddings, beta2 0.99), gradient clip
1.0, dropout 0. Times are training wall time only; each side's validation
curve is measured outside its timer.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tables import render  # benchmarks/ is sys.path[0] as a script

ROOT = Path(__file__).resolve().parent.parent
RECIPE = dict(layers=4, heads=4, embed_dim=128, seq_len=64, batch_size=12, lr=1e-3, min_lr=1e-4,
              warmup=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "examples" / "tinyshakespeare.txt")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--png", type=Path, help="plot both curves into this file (matplotlib)")
    return p.parse_args()


def sqlgpt_run(corpus, db, args):
    """Train with sqlgpt's library; returns (seconds, model, [(step, val)])."""
    import sqlgpt
    from sqlgpt.model.arch import preset
    from sqlgpt.model.config import TrainConfig
    from sqlgpt.train.trainer import Trainer
    r = RECIPE
    arch = preset("gpt2", embed_dim=r["embed_dim"], num_heads=r["heads"], num_layers=r["layers"],
                  seq_len=r["seq_len"])
    cfg = TrainConfig(tokenizer="char", vocab_size=0, batch_size=r["batch_size"], lr=r["lr"],
                      min_lr=r["min_lr"], warmup_iters=r["warmup"], lr_schedule="cosine",
                      lr_decay_iters=args.iters, max_iters=args.iters, optimizer="adamw",
                      weight_decay=r["weight_decay"], beta2=r["beta2"],
                      grad_clip=r["grad_clip"], dropout=0.0, eval_iters=0,
                      eval_every=10**9)  # evaluations happen outside the timer
    trainer = Trainer.create(db, [corpus], arch, cfg)
    seconds, curve = 0.0, []
    for stop in range(args.eval_every, args.iters + 1, args.eval_every):
        start = time.perf_counter()
        trainer.run(stop, save_every=args.iters)
        seconds += time.perf_counter() - start
        curve.append((stop, trainer.evaluate().loss, seconds))
    tokens = (np.asarray(trainer.train_tokens), np.asarray(trainer.val_tokens))
    trainer.close()
    return seconds, sqlgpt.load(db), curve, tokens


def torch_run(train_ids, val_ids, arch, args):
    """nanoGPT's model and training loop on the same ids."""
    import torch
    from torch_gpt import build
    r = RECIPE
    torch.manual_seed(1337)
    model = build({**arch.to_dict(), "dropout": 0.0})
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": plain, "weight_decay": 0.0}], lr=r["lr"],
                            betas=(0.9, r["beta2"]), fused=True)
    rng = np.random.default_rng(1337)
    T, B = r["seq_len"], r["batch_size"]
    train = torch.from_numpy(train_ids.astype(np.int64))
    seconds, curve = 0.0, []
    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        lr = nanogpt_lr(it, args.iters)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(train) - T, B))
        index = starts[:, None] + torch.arange(T)
        loss = model(train[index], train[index + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        if it % args.eval_every == 0:
            seconds += time.perf_counter() - start
            curve.append((it, torch_val_loss(model, val_ids), seconds))
            start = time.perf_counter()
    return seconds, curve


def nanogpt_lr(it, iters):
    r = RECIPE
    if it <= r["warmup"]:
        return r["lr"] * it / (r["warmup"] + 1)
    ratio = min(1.0, (it - r["warmup"]) / (iters - r["warmup"]))
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["lr"] - r["min_lr"])


def torch_val_loss(model, val_ids):
    """The held-out split in non-overlapping windows of the context, as
    sqlgpt's evaluation with stride = context scores it."""
    import torch
    from sqlgpt.train.evaluate import windows
    T = RECIPE["seq_len"]
    ids = torch.from_numpy(val_ids.astype(np.int64))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start, first in windows(len(ids) - 1, T, T):
            x, y = ids[start:start + T][None], ids[start + 1:start + T + 1][None].clone()
            y[0, :max(0, first)] = 0
            n = int((y != 0).sum())
            total += model(x, y).item() * n
            count += n
    model.train()
    return total / count


def main(args):
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, model, ours_curve, (train_ids, val_ids) = sqlgpt_run(args.corpus,
                                                                     Path(tmp) / "m.db", args)
        theirs_s, theirs_curve = torch_run(train_ids, val_ids, model.arch, args)
    result = {"iters": args.iters, "recipe": RECIPE,
              "sqlgpt": {"train_s": ours_s, "curve": ours_curve},
              "pytorch": {"train_s": theirs_s, "curve": theirs_curve}}
    rows = [[str(step), f"{a:.4f}", f"{b:.4f}"]
            for (step, a, _), (_, b, _) in zip(ours_curve, theirs_curve)]
    rows.append(["train s", f"{ours_s:.1f}", f"{theirs_s:.1f}"])
    print(render(["step", "sqlgpt val loss", "PyTorch (nanoGPT) val loss"], rows, args.markdown))
    final = ours_curve[-1][1] - theirs_curve[-1][1]
    print(f"final val loss difference {final:+.4f}; time ratio {ours_s / theirs_s:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.png:
        plot(result, args.png)


def plot(result, path):
    """Both validation curves, against step and against training seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, label in (("sqlgpt", "sqlgpt"), ("pytorch", "PyTorch, nanoGPT's model")):
        steps, losses, seconds = zip(*result[name]["curve"])
        axes[0].plot(steps, losses, marker="o", label=label)
        axes[1].plot(seconds, losses, marker="o", label=label)
    axes[0].set(xlabel="step", ylabel="validation loss")
    axes[1].set(xlabel="training seconds")
    axes[0].legend()
    fig.suptitle(f"nanoGPT's Tiny Shakespeare recipe, {result['iters']} steps")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
