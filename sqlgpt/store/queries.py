"""Questions a model's database answers in plain SQL: the README's ten, and
Datasette's canned queries (sqlgpt datasette-metadata), from this one list."""
import json

from .connection import prefixed, schema_version, sqlite_errors, tables_at
from .migrations import open_database

# name -> (title, SQL); every query reads only sqlgpt's own tables and views
QUERIES = {
    "largest_matrices": (
        "The matrices with the largest L2 norm",
        "SELECT name, rows, cols, round(std, 4) AS std, round(l2, 2) AS l2 FROM tensors "
        "WHERE rows > 1 ORDER BY l2 DESC LIMIT 4"),
    "layer_norms": (
        "Each block's size: the L2 norm of all its tensors",
        "SELECT layer, round(sqrt(sum(l2 * l2)), 2) AS l2 FROM tensors "
        "WHERE layer IS NOT NULL GROUP BY layer"),
    "parameters_by_component": (
        "Where the parameters are",
        "SELECT component, sum(rows * cols) AS parameters FROM tensors GROUP BY component "
        "ORDER BY parameters DESC, component LIMIT 4"),
    "loss_curve": (
        "The loss curve with its learning rate and gradient norm",
        "SELECT step, round(loss, 3) AS loss, round(lr, 6) AS lr, "
        "round(grad_norm, 3) AS grad_norm FROM metrics WHERE step % 40 = 0"),
    "steepest_gradients": (
        "The steps with the largest gradients",
        "SELECT step, round(grad_norm, 3) AS grad_norm, round(loss, 3) AS loss FROM metrics "
        "ORDER BY grad_norm DESC LIMIT 3"),
    "train_and_validation": (
        "Training against validation at every checkpoint",
        "SELECT c.step, round(c.train_loss, 3) AS train, round(e.loss, 3) AS val, "
        "round(e.perplexity, 2) AS perplexity, round(e.accuracy, 3) AS accuracy "
        "FROM checkpoints c JOIN evaluations e USING (step)"),
    "best_checkpoint": (
        "The best validation loss",
        "SELECT step, round(loss, 4) AS best_val_loss FROM evaluations ORDER BY loss LIMIT 1"),
    "tensor_over_time": (
        "How the first block's query matrix grew across checkpoints",
        "SELECT step, round(l2, 3) AS l2, round(std, 5) AS std, round(max, 3) AS max "
        "FROM tensor_stats WHERE name = 'layers.0.q' ORDER BY step"),
    "commonest_tokens": (
        "The commonest tokens of the corpus",
        "SELECT id, quote(token) AS token, count FROM vocab ORDER BY count DESC LIMIT 5"),
    "config": (
        "The architecture's main settings",
        "SELECT key, value FROM config WHERE key IN ('preset', 'tokenizer', 'n_vocab', "
        "'embed_dim', 'num_layers', 'seq_len')"),
}

# what Datasette says of each table and view
DESCRIPTIONS = {
    "tensors": "One row per stored tensor of the latest checkpoint: shape and statistics.",
    "tensor_stats": "Every tensor's statistics at each checkpoint.",
    "metrics": "One row per training step: loss, learning rate, tokens/s, gradient norm.",
    "evaluations": "Each evaluation of the held-out text: loss, perplexity, accuracy.",
    "checkpoints": "One row per saved checkpoint.",
    "config": "Architecture and training settings.",
    "vocab": "Every token id: readable text, exact bytes, count in the corpus.",
    "tokenizer": "The rest of the tokenizer (kind, BPE merges).",
    "train_state": "What resuming needs: step, RNG state, the corpus and its hashes (JSON).",
    "embeddings": "Token and position embeddings, a float32 BLOB per row (with Adam moments).",
    "layers": "Every block tensor, a float32 BLOB per matrix row (with Adam moments).",
    "head": "The output projection, a float32 BLOB per row (empty when tied to wte).",
    "norms": "The final norm's gain and bias.",
    "checkpoint_weights": "Older checkpoints kept by train --keep: weights only.",
}
# tables of BLOB rows: hidden from Datasette's index (still reachable by URL and SQL)
HIDDEN = ("embeddings", "layers", "head", "norms", "checkpoint_weights", "train_state",
          "tokenizer")


def datasette_metadata(db_name, prefix=""):
    """Datasette's metadata (as a JSON-ready dict) for a model database
    served under db_name (its file name without .db); with prefix, for the
    model under that table prefix in an app's database."""
    return {
        "title": "sqlgpt model",
        "description": "A language model stored in SQLite by sqlgpt: its tensors, "
                       "training history and vocabulary.",
        "databases": {db_name: {
            "tables": {prefix + name: {"description": text,
                                       **({"hidden": True} if name in HIDDEN else {})}
                       for name, text in DESCRIPTIONS.items()},
            "queries": {prefix + name: {"title": title, "sql": prefixed(sql, prefix)}
                        for name, (title, sql) in QUERIES.items()},
        }},
    }


def metadata_json(db_name, prefix=""):
    return json.dumps(datasette_metadata(db_name, prefix), indent=2)


def read_curves(db_path, prefix=""):
    """(metrics, evaluations) of the database at db_path, in step order:
    rows (step, loss, lr, grad_norm) and (step, loss) (none before the
    schema had an evaluations table)."""
    conn = open_database(db_path, prefix=prefix)
    try:
        with sqlite_errors(f"cannot read {db_path}"):
            metrics = conn.execute("SELECT step, loss, lr, grad_norm FROM metrics "
                                   "ORDER BY step").fetchall()
            evals = conn.execute("SELECT step, loss FROM evaluations ORDER BY step").fetchall() \
                if "evaluations" in tables_at(schema_version(conn)) else []
    finally:
        conn.close()
    return metrics, evals
