"""Labelled texts: read from a query's rows, a CSV file or JSON Lines,
encoded once (truncated to the context), and split into training and
held-out rows."""
import csv
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..contract import MAX_LABELS
from ..data.corpus import SqlSource
from ..errors import SqlgptError

CSV_FIELD_LIMIT = 1 << 24  # characters of one CSV field


def read_labelled(source):
    """Yield (text, label) of a SqlSource's rows, or of a .csv file (a header
    row naming `text` and `label` columns) or a .jsonl file (objects with
    `text` and `label`); a bad row is a one-line error naming it."""
    if isinstance(source, SqlSource):
        yield from source.rows()
        return
    path = str(source)
    if path.endswith(".csv"):
        yield from _csv_rows(path)
    elif path.endswith((".jsonl", ".json")):
        yield from _jsonl_rows(path)
    else:
        raise SqlgptError(f"{path}: a classifier's examples are a .csv file (columns text and "
                          f"label), a .jsonl file, or --sql rows")


def _checked(where, text, label):
    for name, value in (("text", text), ("label", label)):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise SqlgptError(f"{where}: no {name}")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise SqlgptError(f"{where}: the {name} must be text (or an integer label)")
    return str(text), str(label)


def _csv_rows(path):
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise SqlgptError(f"{path}: the header row must name a text and a label column")
            for row in reader:
                yield _checked(f"{path} line {reader.line_num}", row.get("text"),
                               row.get("label"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SqlgptError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _jsonl_rows(path):
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise SqlgptError(f"{where}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise SqlgptError(f"{where}: not an object with text and label")
                yield _checked(where, row.get("text"), row.get("label"))
    except (OSError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


@dataclass
class Examples:
    """Encoded rows: ids (n, T) padded on the right, lens (n), labels (n)."""
    ids: np.ndarray
    lens: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    @classmethod
    def encode(cls, pairs, tokenizer, labels, T):
        """(Examples, how many texts were cut to T tokens, digest of the rows)
        of (text, label) pairs, each label's id its place in labels."""
        index = {name: i for i, name in enumerate(labels)}
        ids, lens, ys, cut = [], [], [], 0
        digest = hashlib.sha256()
        pad = tokenizer.pad_id or 0
        for number, (text, label) in enumerate(pairs, 1):
            for part in (text, label):
                data = part.encode("utf-8", "surrogatepass")
                digest.update(len(data).to_bytes(8, "little") + data)
            row = np.asarray(tokenizer.encode(text), dtype=np.int32)
            if not len(row):
                raise SqlgptError(f"example {number} encodes to no tokens")
            cut += len(row) > T
            row = row[:T]
            ids.append(np.pad(row, (0, T - len(row)), constant_values=pad))
            lens.append(len(row))
            ys.append(index[label])
        if not ids:
            raise SqlgptError("no labelled examples to train on")
        return cls(np.stack(ids), np.asarray(lens, np.int32), np.asarray(ys, np.int32)), cut, \
            digest.hexdigest()

    def split(self, val_fraction, seed):
        """(train, held-out or None): a seeded shuffle's last val_fraction held out."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = int(len(self) * val_fraction)
        if n_val < 1 or n_val >= len(self):
            return self, None
        return self.rows(order[:-n_val]), self.rows(order[-n_val:])

    def rows(self, which):
        return Examples(self.ids[which], self.lens[which], self.labels[which])

    def batch(self, rng, n):
        """n random rows (with replacement), cut to their longest length."""
        return self.rows(rng.integers(0, len(self), n)).trimmed()

    def trimmed(self):
        """The same rows without the padding columns no row needs."""
        T = int(self.lens.max())
        return Examples(np.ascontiguousarray(self.ids[:, :T]), self.lens, self.labels)


def label_names(pairs):
    """The sorted distinct labels of (text, label) pairs: at least two."""
    names = sorted({label for _, label in pairs})
    if len(names) < 2:
        raise SqlgptError(f"a classifier needs at least two labels; the examples have "
                          f"{len(names)}")
    if len(names) > MAX_LABELS:
        raise SqlgptError(f"the examples have {len(names):,} labels; at most {MAX_LABELS:,}")
    return names


@dataclass
class Scores:
    """A classifier on held-out rows: mean loss, accuracy, macro-F1 and the
    confusion matrix (rows the true label, columns the predicted)."""
    loss: float
    accuracy: float
    macro_f1: float
    confusion: list
    examples: int


def scores(loss, predicted, true, num_labels):
    """Scores of predicted against true label ids."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    hits = np.diag(confusion).astype(np.float64)
    precision = np.divide(hits, confusion.sum(axis=0), out=np.zeros(num_labels),
                          where=confusion.sum(axis=0) > 0)
    recall = np.divide(hits, confusion.sum(axis=1), out=np.zeros(num_labels),
                       where=confusion.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_labels),
                   where=precision + recall > 0)
    present = (confusion.sum(axis=1) + confusion.sum(axis=0)) > 0  # labels seen at all
    return Scores(float(loss), float(hits.sum() / max(len(true), 1)),
                  float(f1[present].mean()) if present.any() else 0.0, confusion.tolist(),
                  int(len(true)))
