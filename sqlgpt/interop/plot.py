"""Pictures of a model: its learning curves from the metrics and
evaluations tables, and every head's attention map for a prompt.
matplotlib is an optional extra (pip install "sqlgpt[plot]")."""
import math

import numpy as np

from .. import store
from ..errors import SqlgptError


def _save(fig, path):
    try:
        fig.savefig(path, dpi=80)
    except OSError as e:
        raise SqlgptError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SqlgptError('pictures need matplotlib: pip install "sqlgpt[plot]"') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def curves(db_path, prefix=""):
    """{name: (steps, values)} of training loss, validation loss, learning
    rate and gradient norm, read from the database."""
    metrics, evals = store.read_curves(db_path, prefix)
    if not metrics:
        raise SqlgptError(f"{db_path} has no training steps to plot")
    out = {}
    for index, name in ((1, "train loss"), (2, "learning rate"), (3, "gradient norm")):
        points = [(r[0], r[index]) for r in metrics if r[index] is not None]
        out[name] = tuple(zip(*points)) if points else ((), ())
    out["validation loss"] = tuple(zip(*evals)) if evals else ((), ())
    return out


def plot_curves(db_path, out_path, prefix=""):
    """Loss (training and validation), learning rate and gradient norm
    against step, in one PNG of three panels."""
    plt = _pyplot()
    series = curves(db_path, prefix)
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(*series["train loss"], lw=1, label="training (each step)")
    if series["validation loss"][0]:
        axes[0].plot(*series["validation loss"], marker="o", label="validation")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(*series["learning rate"], lw=1)
    axes[1].set_ylabel("learning rate")
    axes[2].plot(*series["gradient norm"], lw=1)
    axes[2].set_ylabel("gradient norm")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(db_path))
    fig.tight_layout()
    _save(fig, out_path)


def attention_maps(model, prompt):
    """(pieces, maps): the prompt's tokens as text and every head's
    attention probabilities, (num_layers, num_heads, T, T), each row a query
    position's weights over the positions up to it. Recomputed from the
    queries and keys the kernel's forward keeps (rotated, for rope)."""
    ids = model.prompt_ids(prompt)
    gpt, arch = model._gpt, model.arch
    gpt.forward(np.asarray(ids, dtype=np.int32)[None])
    T, H, KV, hs = len(ids), arch.num_heads, arch.n_kv_heads, arch.head_dim
    mask = np.triu(np.full((T, T), -np.inf), 1)
    maps = np.empty((arch.num_layers, H, T, T))
    for layer, acts in enumerate(gpt.acts.layers):
        q = acts["q"][:T].reshape(T, H, hs).astype(np.float64)
        k = acts["k"][:T].reshape(T, KV, hs).astype(np.float64)
        for h in range(H):
            scores = q[:, h] @ k[:, h // (H // KV)].T / math.sqrt(hs) + mask
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            maps[layer, h] = scores / scores.sum(axis=1, keepdims=True)
    return model.tokenizer.pieces([int(i) for i in ids]), maps


def plot_attention(model, prompt, out_path):
    """A grid of every layer's (rows) and head's (columns) attention map."""
    plt = _pyplot()
    pieces, maps = attention_maps(model, prompt)
    layers, heads, T = maps.shape[:3]
    size = max(1.6, min(4.0, 0.25 * T))
    fig, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers),
                             squeeze=False)
    labels = [p.replace("\n", "\\n") for p in pieces]
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            show = T <= 24  # token labels while they stay readable
            ax.set_xticks(range(T) if show else [])
            ax.set_yticks(range(T) if show else [])
            if show:
                ax.set_xticklabels(labels, rotation=90, fontsize=6)
                ax.set_yticklabels(labels, fontsize=6)
    fig.suptitle(f"attention for {prompt!r} (rows: queries, columns: keys)")
    fig.tight_layout()
    _save(fig, out_path)
