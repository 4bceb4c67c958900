"""A classifier's own rows: its labels and its held-out scores."""
import json

from ..errors import SqlgptError
from .connection import atomic, sqlite_errors


def write_labels(conn, labels):
    """The labels, id i the i-th name (inside the caller's transaction)."""
    conn.executemany("INSERT INTO labels (id, name) VALUES (?, ?)", enumerate(labels))


def read_labels(conn, num_labels):
    """The label names by id; a one-line error unless there are num_labels."""
    with sqlite_errors("cannot read the labels table"):
        rows = conn.execute("SELECT id, name FROM labels ORDER BY id").fetchall()
    if [i for i, _ in rows] != list(range(num_labels)) or \
            not all(isinstance(name, str) for _, name in rows):
        raise SqlgptError(f"the labels table does not hold the classifier's {num_labels} "
                          f"labels: the file is damaged")
    return [name for _, name in rows]


def write_classifier_eval(conn, step, scores):
    """A held-out evaluation's row (ClassifierScores), in its own transaction."""
    with sqlite_errors("cannot write the evaluation"), atomic(conn):
        conn.execute("INSERT OR REPLACE INTO classifier_evals (step, loss, accuracy, macro_f1, "
                     "confusion, examples) VALUES (?, ?, ?, ?, ?, ?)",
                     (step, scores.loss, scores.accuracy, scores.macro_f1,
                      json.dumps(scores.confusion), scores.examples))


def read_classifier_evals(conn):
    """Every evaluation's row as a dict, by step."""
    with sqlite_errors("cannot read the classifier_evals table"):
        rows = conn.execute("SELECT step, loss, accuracy, macro_f1, confusion, examples "
                            "FROM classifier_evals ORDER BY step").fetchall()
    return [{"step": s, "loss": loss, "accuracy": a, "macro_f1": f, "confusion": json.loads(c),
             "examples": n} for s, loss, a, f, c, n in rows]
