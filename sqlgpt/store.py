"""Every SQL statement sqlgpt runs: creating a database, checkpoints (one
transaction each), and loading with validation of everything read.

A database is created whole: schema, config, vocabulary and the step-0
checkpoint are written to a temporary file which is then renamed into place,
so the path never holds a half-made model. Later checkpoints replace the
weights inside one BEGIN IMMEDIATE ... COMMIT, so readers (WAL) and a crash
only ever see the previous checkpoint or the new one.
"""
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import sqlite_utils

from .errors import SqlgptError
from .model import Config
from .tokenizers import TOKENIZERS

APPLICATION_ID = 0x53514C47  # "SQLG": marks a file as sqlgpt's
SCHEMA_VERSION = 1
WEIGHT_TABLES = ("embeddings", "layers", "head")
REQUIRED_TABLES = ("config", "vocab", "train_state", "checkpoints", "metrics") + WEIGHT_TABLES
BUSY_TIMEOUT_MS = 10_000


def schema_sql():
    """schema.sql: shipped inside the package, or at the repository root."""
    here = Path(__file__).resolve().parent
    for path in (here / "schema.sql", here.parent / "schema.sql"):
        if path.is_file():
            return path.read_text()
    raise SqlgptError("schema.sql is missing from the installation")


# ---- where each parameter's rows live ----
def row_key(name):
    """(table, key values before the row index) for a parameter name."""
    if name in ("wte", "wpe"):
        return "embeddings", (name,)
    if name == "head":
        return "head", ()
    _, layer, component = name.split(".")
    return "layers", (int(layer), component)


INSERT_SQL = {
    "embeddings": "INSERT INTO embeddings (type, position, data, m, v) VALUES (?, ?, ?, ?, ?)",
    "layers": "INSERT INTO layers (layer, component, i, data, m, v) VALUES (?, ?, ?, ?, ?, ?)",
    "head": "INSERT INTO head (i, data, m, v) VALUES (?, ?, ?, ?)",
}
SELECT_SQL = {
    "embeddings": "SELECT type, position, data, m, v FROM embeddings ORDER BY type, position",
    "layers": "SELECT layer, component, i, data, m, v FROM layers ORDER BY layer, component, i",
    "head": "SELECT i, data, m, v FROM head ORDER BY i",
}


def _le32(matrix):
    """Rows of a float32 matrix as little-endian BLOBs."""
    return [row.tobytes() for row in matrix.astype("<f4", copy=False)]


def weight_rows(params):
    """(table, row tuple) for every matrix row of every parameter."""
    for t in params:
        table, key = row_key(t.name)
        for i, blobs in enumerate(zip(_le32(t.data), _le32(t.m), _le32(t.v))):
            yield table, key + (i,) + blobs


# ---- opening ----
def _connect(path, readonly):
    uri = f"file:{Path(path).resolve().as_posix()}?mode={'ro' if readonly else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA trusted_schema = OFF")  # never run functions a foreign schema names
    return conn


def _check_is_sqlite(path):
    path = Path(path)
    if not path.exists():
        raise SqlgptError(f"database {path} does not exist")
    if not path.is_file():
        raise SqlgptError(f"{path} is not a file")
    with open(path, "rb") as f:
        header = f.read(16)
    if header != b"SQLite format 3\x00":
        raise SqlgptError(f"{path} is not a SQLite database")


def open_database(path, readonly=True):
    """Open an existing sqlgpt database after checking it is one this version
    can read. Read-only opens never modify the file."""
    _check_is_sqlite(path)
    try:
        conn = _connect(path, readonly)
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = set(sqlite_utils.Database(conn).table_names())
    except sqlite3.DatabaseError as e:
        raise SqlgptError(f"cannot read {path}: {e}") from None
    if app_id != APPLICATION_ID:
        conn.close()
        raise SqlgptError(f"{path} is not a sqlgpt database")
    if version > SCHEMA_VERSION:
        conn.close()
        raise SqlgptError(f"{path} has schema version {version}, newer than this sqlgpt "
                          f"supports ({SCHEMA_VERSION}); upgrade sqlgpt")
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        conn.close()
        raise SqlgptError(f"{path} is damaged: missing table(s) {', '.join(missing)}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def create_database(path, model, tokenizer, state):
    """Write a new database with the step-0 checkpoint, atomically: built
    under a temporary name, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(schema_sql())
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO vocab (word, id) VALUES (?, ?)", tokenizer.vocab())
        conn.execute("COMMIT")
        save_checkpoint(conn, model, state, train_loss=None, val_loss=None)
        conn.close()  # folds the WAL into the file, so the rename moves everything
        for stale in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            stale.unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    return open_database(path, readonly=False)


# ---- writing ----
def save_checkpoint(conn, model, state, train_loss, val_loss):
    """One transaction: config, every weight row with its moments, the training
    state and a checkpoints row. All of it commits, or none of it."""
    rows = {table: [] for table in WEIGHT_TABLES}
    for table, row in weight_rows(model.params):
        rows[table].append(row)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)",
                         model.cfg.to_dict().items())
        for table in WEIGHT_TABLES:
            conn.execute(f"DELETE FROM {table}")
            conn.executemany(INSERT_SQL[table], rows[table])
        conn.executemany("INSERT OR REPLACE INTO train_state (key, value) VALUES (?, ?)",
                         [(k, json.dumps(v)) for k, v in state.items()])
        conn.execute("INSERT OR REPLACE INTO checkpoints (step, train_loss, val_loss, elapsed_s) "
                     "VALUES (?, ?, ?, ?)",
                     (state["step"], train_loss, val_loss, state["elapsed_s"]))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
            conn.execute("ROLLBACK")
        raise


def write_metrics(conn, rows):
    """rows: (step, loss, lr, tokens_per_sec) tuples, in one small transaction."""
    if not rows:
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR REPLACE INTO metrics (step, loss, lr, tokens_per_sec) "
                         "VALUES (?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# ---- reading, validating everything ----
def read_config(conn):
    try:
        values = dict(conn.execute("SELECT key, value FROM config"))
        cfg = Config.from_dict(values)
        missing = [k for k in ("vocab_size", "embed_dim", "num_heads", "num_layers", "seq_len")
                   if k not in values]
    except (sqlite3.DatabaseError, TypeError) as e:
        raise SqlgptError(f"the config table is damaged: {e}") from None
    if missing:
        raise SqlgptError(f"the config table is missing {', '.join(missing)}")
    try:
        return cfg.validate()
    except SqlgptError as e:
        raise SqlgptError(f"the stored config is invalid: {e}") from None


def read_tokenizer(conn, cfg):
    try:
        pairs = [(w, i) for w, i in conn.execute("SELECT word, id FROM vocab")]
    except sqlite3.DatabaseError as e:
        raise SqlgptError(f"the vocab table is damaged: {e}") from None
    if not all(isinstance(w, str) and isinstance(i, int) for w, i in pairs):
        raise SqlgptError("the vocab table is damaged (wrong value types)")
    tokenizer = TOKENIZERS[cfg.tokenizer].from_vocab(pairs)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise SqlgptError(f"the vocab table has {tokenizer.vocab_size} words but config says "
                          f"vocab_size {cfg.vocab_size}")
    return tokenizer


def read_weights(conn, model):
    """Fill every parameter's data, m and v from the weight tables, checking
    that each one has exactly its rows and every BLOB exactly its length."""
    found = {}
    try:
        for table in WEIGHT_TABLES:
            for row in conn.execute(SELECT_SQL[table]):
                *key, data, m, v = row
                name = _param_name(table, key[:-1])
                found.setdefault(name, []).append((key[-1], data, m, v))
    except sqlite3.DatabaseError as e:
        raise SqlgptError(f"cannot read weights: {e}") from None
    expected = {t.name for t in model.params}
    unknown = set(found) - expected
    if unknown:
        raise SqlgptError(f"weights for unknown parameter(s): {', '.join(sorted(unknown))}")
    for t in model.params:
        rows = found.get(t.name, [])
        nrows, ncols = t.shape
        if [r[0] for r in rows] != list(range(nrows)):
            raise SqlgptError(f"weights of {t.name} are damaged: expected rows 0..{nrows - 1}, "
                              f"found {len(rows)}")
        for col, buf in ((1, t.data), (2, t.m), (3, t.v)):
            blobs = [r[col] for r in rows]
            if not all(isinstance(b, bytes) and len(b) == 4 * ncols for b in blobs):
                raise SqlgptError(f"weights of {t.name} are damaged: a row is not {ncols} "
                                  f"float32 values")
            buf[...] = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(t.shape)
        if not np.isfinite(t.data).all():
            raise SqlgptError(f"weights of {t.name} contain NaN or Inf")


def _param_name(table, key):
    if table == "embeddings":
        return str(key[0])
    if table == "head":
        return "head"
    return f"layers.{key[0]}.{key[1]}"


def read_train_state(conn):
    try:
        return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM train_state")}
    except (sqlite3.DatabaseError, TypeError, ValueError) as e:
        raise SqlgptError(f"the train_state table is damaged: {e}") from None


def checkpoints(conn):
    return [dict(zip(("step", "train_loss", "val_loss", "elapsed_s", "created_at"), row))
            for row in conn.execute("SELECT step, train_loss, val_loss, elapsed_s, created_at "
                                    "FROM checkpoints ORDER BY step")]

