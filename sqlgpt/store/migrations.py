"""Opening an existing database: the checks that it is a sqlgpt model of a
version this sqlgpt reads, and the numbered migrations that bring older
files up to SCHEMA_VERSION."""
import sqlite3
import types

import sqlite_utils

from ..model.arch import stored_tensors
from ..model.config import from_rows, to_rows
from ..errors import SqlgptError
from ..model.tensor import ParameterSet
from .connection import (SCHEMA_VERSION, _check_is_sqlite, _connect, _durable, _is_marked,
                         _on_read_only_media, _refusal, _set_schema_version, atomic,
                         check_prefix, foreign_views, schema_objects, schema_version)
from .rows import TENSOR_STATS_SQL, read_config, read_weights, tensor_stats


def open_database(path, readonly=True, prefix=""):
    """Open an existing sqlgpt database after checking it is one this version
    can read (with prefix: the model under that prefix in an app's database).
    Read-only opens never modify the file (an older schema version is read
    as it is); opening for writing first migrates it to SCHEMA_VERSION."""
    check_prefix(prefix)
    _check_is_sqlite(path)
    try:
        conn = None
        try:
            conn = _connect(path, readonly, prefix=prefix)
            marked = _is_marked(conn)
        except sqlite3.OperationalError:
            if conn:
                conn.close()
            if not (readonly and _on_read_only_media(path)):
                raise
            # a WAL reader needs a -shm file beside the database; where none
            # can be created, nobody can be writing either: read it as immutable
            conn = _connect(path, readonly, immutable=True, prefix=prefix)
            marked = _is_marked(conn)
        version = schema_version(conn) if marked else 0
        # no plugins, no recursive_triggers pragma: the file may be hostile
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        tables = {name.lower()[len(prefix):] for name in db.table_names()
                  if name.lower().startswith(prefix)}
        extras = foreign_views(conn, version)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read {path}: {e}") from None
    problem = _refusal(path, prefix, marked, version, tables, extras)
    if problem:
        conn.close()
        raise SqlgptError(problem)
    if not readonly:
        try:
            if not prefix:  # an app's file keeps its own journal mode and synchronous
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            migrate(conn, path)
        except BaseException:
            conn.close()
            raise
    return conn


# ---- migrations ----
# Each step takes a database from version N (its key) to N + 1 inside the one
# transaction that also sets user_version, so a file is always at one version
# or the next. A step's SQL is frozen as that version had it: a later
# schema.sql must not change what an old step creates (tests check that a
# migrated file has the same tables as a new one).
def _v1_to_v2(conn):
    """Version 2 stores norm gains and biases (layers holds the per-layer ones
    already), the architecture in config, the whole tokenizer (vocab by
    id with readable text and bytes, and the tokenizer table) and each
    step's gradient norm in metrics. A version-1 file is the lua
    preset: it has no rows for the new table, and gains the architecture keys
    (the values from_rows derives for it) without any of its keys changing."""
    conn.execute("""
        CREATE TABLE norms (
            name TEXT NOT NULL,
            i    INTEGER NOT NULL,
            data BLOB NOT NULL,
            m    BLOB NOT NULL,
            v    BLOB NOT NULL,
            crc  INTEGER NOT NULL,
            PRIMARY KEY (name, i)
        )""")
    values = dict(conn.execute("SELECT key, value FROM config"))
    conn.executemany("INSERT OR IGNORE INTO config (key, value) VALUES (?, ?)",
                     to_rows(*from_rows(values)))
    # the vocabulary by id with readable text and exact bytes, and the
    # tokenizer's own table: a version-1 file has the word tokenizer
    conn.execute("ALTER TABLE vocab RENAME TO vocab_v1")
    conn.execute("""
CREATE TABLE vocab (
    id    INTEGER PRIMARY KEY,
    token TEXT NOT NULL,
    bytes BLOB
)""")
    conn.execute("""
        INSERT INTO vocab (id, token, bytes)
        SELECT id, word, CASE WHEN word IN ('<pad>', '<unk>') THEN NULL
                              ELSE CAST(word AS BLOB) END FROM vocab_v1""")
    conn.execute("DROP TABLE vocab_v1")
    conn.execute("ALTER TABLE metrics ADD COLUMN grad_norm REAL")
    conn.execute("""
CREATE TABLE evaluations (
    step       INTEGER PRIMARY KEY,
    loss       REAL NOT NULL,
    perplexity REAL NOT NULL,
    accuracy   REAL NOT NULL,
    tokens     INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)""")
    conn.execute("""
CREATE TABLE tokenizer (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""")
    conn.execute("INSERT INTO tokenizer (key, value) VALUES ('kind', 'word')")


def _v2_to_v3(conn):
    """Version 3 keeps summary statistics of every tensor at each checkpoint
    (tensor_stats, filled here for the latest checkpoint from its weights,
    which are read and validated as a load does) with the `tensors` view
    over the latest, and counts each token id's occurrences in the corpus
    (vocab.count: unknown, NULL, for files trained before)."""
    conn.execute("""
CREATE TABLE tensor_stats (
    step      INTEGER NOT NULL,
    name      TEXT NOT NULL,
    layer     INTEGER,
    component TEXT NOT NULL,
    rows      INTEGER NOT NULL,
    cols      INTEGER NOT NULL,
    mean      REAL NOT NULL,
    std       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    l2        REAL NOT NULL,
    PRIMARY KEY (step, name)
)""")
    conn.execute("""
CREATE VIEW tensors AS
    SELECT name, layer, component, rows, cols, mean, std, min, max, l2
    FROM tensor_stats
    WHERE step = (SELECT max(step) FROM tensor_stats)""")
    conn.execute("""
CREATE TABLE checkpoint_weights (
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    i    INTEGER NOT NULL,
    data BLOB NOT NULL,
    crc  INTEGER NOT NULL,
    PRIMARY KEY (step, name, i)
)""")
    conn.execute("ALTER TABLE vocab ADD COLUMN count INTEGER")
    arch, _ = read_config(conn)
    model = types.SimpleNamespace(arch=arch, params=ParameterSet(stored_tensors(arch)))
    read_weights(conn, model)
    step = conn.execute("SELECT max(step) FROM checkpoints").fetchone()[0] or 0
    conn.executemany(TENSOR_STATS_SQL, tensor_stats(model.params, step))


def _v3_to_v4(conn):
    """Version 4 can keep integer copies of the matrices (the quantized
    table, empty until sqlgpt quantize fills it)."""
    conn.execute(next(sql for kind, name, sql in schema_objects() if name == "quantized"))


def _v4_to_v5(conn):
    """Version 5 can hold a classifier: its head's rows, its labels and its
    held-out scores (three tables, empty for a language model)."""
    for name in ("classifier", "labels", "classifier_evals"):
        conn.execute(next(sql for kind, n, sql in schema_objects() if n == name))


def _v5_to_v6(conn):
    """Version 6 can keep an import's tensors in the precision they came in
    (the tensor_formats table; empty: every tensor float32, as before)."""
    conn.execute(next(sql for kind, name, sql in schema_objects() if name == "tensor_formats"))


MIGRATIONS = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5, 5: _v5_to_v6}


def migrate(conn, path):
    """Apply the migrations a database needs, each in its own transaction.
    The version is read inside each transaction, so two writers that open an
    old file at once migrate it once."""
    while _migrate_step(conn, path):
        pass


def _migrate_step(conn, path):
    """Migrate one version up; False when there is nothing to do."""
    with _durable(conn):
        version = None
        try:
            with atomic(conn):
                version = schema_version(conn)
                if version >= SCHEMA_VERSION:
                    return False
                if version not in MIGRATIONS:
                    raise SqlgptError(f"no migration from schema version {version}")
                MIGRATIONS[version](conn)
                _set_schema_version(conn, version + 1)
            return True
        except (sqlite3.Error, SqlgptError, UnicodeDecodeError) as e:
            step = f" from schema version {version} to {version + 1}" if version is not None \
                else ""
            raise SqlgptError(f"cannot migrate {path}{step} (the file is unchanged): "
                              f"{e}") from None

