"""Every SQL statement sqlgpt runs: creating a database, checkpoints (one
transaction each), loading with validation of everything read, and the
numbered migrations that bring older files up to SCHEMA_VERSION.

Where each tensor's rows live comes from its TensorSpec (arch.py's tensor
table): its layer and component, never its name's spelling.

A database is created whole: schema, config, vocabulary and the step-0
checkpoint are written to a temporary file which is then renamed into place,
so the path never holds a half-made model. Later checkpoints replace the
weights inside one BEGIN IMMEDIATE ... COMMIT, so readers (WAL) and a crash
only ever see the previous checkpoint or the new one.
"""
import contextlib
import fcntl
import functools
import json
import math
import os
import re
import sqlite3
import types
import weakref
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import sqlite_utils

from .._kernel import ffi, lib
from ..model.arch import stored_tensors
from ..model.config import from_rows, to_rows
from ..errors import SqlgptError
from ..model.tensor import ParameterSet, fptr
from ..data.tokenizers import from_storage

APPLICATION_ID = 0x53514C47  # "SQLG": marks a file as sqlgpt's
SCHEMA_VERSION = 4
WEIGHT_TABLES = ("embeddings", "layers", "head", "norms")
REQUIRED_TABLES = ("config", "vocab", "tokenizer", "train_state", "checkpoints",
                   "metrics", "evaluations", "tensor_stats", "checkpoint_weights",
                   "quantized") + WEIGHT_TABLES
# the schema version that added a table (the others are in every version)
ADDED_IN = {"norms": 2, "tokenizer": 2, "evaluations": 2, "tensor_stats": 3,
            "checkpoint_weights": 3, "quantized": 4}
# the views sqlgpt creates, and the version that added each
VIEWS_ADDED_IN = {"tensors": 3}
_NAME_RE = re.compile(r"\b(FROM|INTO|UPDATE|JOIN|TABLE|VIEW|EXISTS)(\s+)("
                      + "|".join(sorted(REQUIRED_TABLES + tuple(VIEWS_ADDED_IN),
                                        key=len, reverse=True)) + r")\b", re.IGNORECASE)
BUSY_TIMEOUT_MS = 10_000
# 64 KB pages: a checkpoint is tens of MB of BLOB rows, and big pages mean far
# fewer overflow pages and page writes per checkpoint
PAGE_SIZE = 65536
# a writer lets one checkpoint's pages stay in memory until commit, so none is
# written twice; a reader reads each page once, and a big cache would only
# cost fresh memory (page faults) on every load
WRITER_CACHE_KB = 512 * 1024
READER_CACHE_KB = 2 * 1024


# ---- a model inside an app's database ----
# With a prefix the model's tables are the prefixed names (gpt_config,
# gpt_layers, ...) in a database that also holds an app's own tables. The
# file's PRAGMAs (application_id, user_version, journal_mode) are the app's:
# a prefixed model keeps its marker and version in {prefix}schema instead,
# and never changes the journal mode.
PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
PREFIX_SCHEMA = "schema"  # {prefix}schema (key, value): application 'sqlgpt', version N


def check_prefix(prefix):
    """A prefix is an identifier (letters, digits, _; up to 32; not sqlite_...),
    in lower case: SQLite's names ignore case, so GPT_ and gpt_ are one prefix."""
    if prefix and (not PREFIX_RE.fullmatch(prefix) or prefix.lower().startswith("sqlite")):
        raise SqlgptError(f"bad --prefix {prefix!r}: use letters, digits and _ (starting with "
                          f"a letter, not 'sqlite'), e.g. gpt_")
    return prefix.lower()


@functools.lru_cache(maxsize=1024)
def prefixed(sql, prefix):
    """sql with every sqlgpt table and view it names (after FROM, INTO,
    UPDATE, JOIN, TABLE, VIEW or EXISTS) given the prefix."""
    if not prefix:
        return sql
    return _NAME_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{prefix}{m.group(3)}", sql)


class ModelConnection(sqlite3.Connection):
    """A connection to one model's tables: sqlgpt's SQL is written once, with
    the plain names, and runs on the prefixed ones where the model has a
    prefix (conn.prefix)."""
    prefix = ""

    def execute(self, sql, *args):
        return super().execute(prefixed(sql, self.prefix), *args)

    def executemany(self, sql, *args):
        return super().executemany(prefixed(sql, self.prefix), *args)


def schema_version(conn):
    """The model's schema version: PRAGMA user_version, or a prefixed
    model's {prefix}schema row (0 where there is none)."""
    prefix = getattr(conn, "prefix", "")
    if not prefix:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    row = conn.execute(f"SELECT value FROM {prefix}{PREFIX_SCHEMA} WHERE key = 'version'") \
        .fetchone()
    return row[0] if row and isinstance(row[0], int) else 0


def _set_schema_version(conn, version):
    if conn.prefix:
        conn.execute(f"INSERT OR REPLACE INTO {conn.prefix}{PREFIX_SCHEMA} (key, value) "
                     f"VALUES ('version', ?)", (version,))
    else:
        conn.execute(f"PRAGMA user_version = {int(version)}")


def schema_sql():
    """schema.sql: shipped inside the package, or at the repository root."""
    here = Path(__file__).resolve().parents[1]  # the sqlgpt package folder
    for path in (here / "schema.sql", here.parent / "schema.sql"):
        if path.is_file():
            return path.read_text()
    raise SqlgptError("schema.sql is missing from the installation")


def tables_at(version):
    """The tables a database of this schema version has."""
    return [t for t in REQUIRED_TABLES if ADDED_IN.get(t, 1) <= version]


def _normal_sql(sql):
    """A statement with comments, IF NOT EXISTS and spacing removed."""
    text = " ".join(re.sub(r"--[^\n]*", "", sql or "").split())
    return re.sub(r" ?([(),=]) ?", r"\1", text.replace(" IF NOT EXISTS", ""))


@functools.lru_cache(maxsize=1)
def schema_objects():
    """(type, name, CREATE statement) of every table, index and view
    schema.sql creates, in its order."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(schema_sql())
        return tuple(conn.execute("SELECT type, name, sql FROM sqlite_master "
                                  "WHERE sql IS NOT NULL ORDER BY rowid"))
    finally:
        conn.close()


def own_views():
    """{name: normalized SQL} of the views schema.sql creates."""
    return {name: _normal_sql(sql) for kind, name, sql in schema_objects() if kind == "view"}


def foreign_views(conn, version):
    """Views and triggers of the model that sqlgpt did not create: any
    trigger on its tables, and any view but its own (with exactly its own
    definition). With a prefix, only views and triggers under the model's
    own names count: the app's, on its own tables, are the app's business."""
    prefix = getattr(conn, "prefix", "")
    own = {prefix + name: prefixed(sql, prefix) for name, sql in own_views().items()
           if VIEWS_ADDED_IN[name] <= version}
    names = {prefix + name for name in REQUIRED_TABLES + tuple(VIEWS_ADDED_IN)}
    found = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                         "WHERE type IN ('view', 'trigger')").fetchall()
    # SQLite's names ignore case: a trigger ON GPT_LAYERS fires on gpt_layers
    return sorted(name for kind, name, table, sql in found
                  if (not prefix or name.lower() in names or table.lower() in names)
                  and (kind == "trigger" or own.get(name.lower()) != _normal_sql(sql)))


# ---- where each parameter's rows live ----
# the table of each model-level tensor (layer None), by its component; every
# tensor of a layer lives in `layers`. A new model-level tensor gets a place
# here (and, for a new table, a migration) before it can be stored.
MODEL_TENSOR_TABLES = {"wte": "embeddings", "wpe": "embeddings", "head": "head",
                       "lnf_w": "norms", "lnf_b": "norms"}
# each table's key columns; the last is the row index
KEY_COLUMNS = {"embeddings": ("type", "position"), "layers": ("layer", "component", "i"),
               "head": ("i",), "norms": ("name", "i")}


def location(spec):
    """(table, key values before the row index) of a TensorSpec's rows."""
    if spec.layer is not None:
        return "layers", (spec.layer, spec.component)
    table = MODEL_TENSOR_TABLES.get(spec.component)
    if table is None:
        raise SqlgptError(f"no table stores the tensor {spec.name}")
    return table, () if table == "head" else (spec.component,)


def describe(table, key):
    """A stored location in words, for errors: `layers (layer=7, component='q')`."""
    if not key:
        return table
    return f"{table} ({', '.join(f'{c}={k!r}' for c, k in zip(KEY_COLUMNS[table], key))})"


INSERT_SQL = {table: f"INSERT INTO {table} (data, m, v, crc, {', '.join(keys)}) "
                     f"VALUES ({', '.join('?' * (len(keys) + 4))})"
              for table, keys in KEY_COLUMNS.items()}
# later checkpoints rewrite the rows in place: no pages freed and reallocated.
# Each row is found by its rowid (read in the same transaction), which skips
# the key index; the key must still match, so a row never lands elsewhere.
UPDATE_SQL = {table: f"UPDATE {table} SET data = ?, m = ?, v = ?, crc = ? WHERE rowid = ? AND "
                     + " AND ".join(f"{k} = ?" for k in keys)
              for table, keys in KEY_COLUMNS.items()}
SELECT_SQL = {table: f"SELECT {', '.join(keys)}, data, m, v, crc FROM {table} "
                     f"ORDER BY {', '.join(keys)}"
              for table, keys in KEY_COLUMNS.items()}
# Loading reads each table twice in one snapshot: how many rows each parameter
# has and the range of their indices, then the rows without any key, so that
# no per-row key objects are built (the load is bound by the work per row,
# not by bytes).
GROUPS_SQL = {table: f"SELECT {', '.join(keys[:-1])}{', ' if len(keys) > 1 else ''}"
                     f"count(*), count(DISTINCT {keys[-1]}), min({keys[-1]}), max({keys[-1]}), "
                     f"total(typeof({keys[-1]}) != 'integer') FROM {table}"
                     + (f" GROUP BY {', '.join(keys[:-1])} ORDER BY {', '.join(keys[:-1])}"
                        if len(keys) > 1 else "")
              for table, keys in KEY_COLUMNS.items()}
# the row index is not fetched: a group of n distinct integer indices from 0
# to n - 1 is exactly 0..n-1 (distinct is checked, not assumed from the
# primary key: a damaged index or a table made elsewhere may repeat one), and
# rows come in index order
ROWS_SQL = {table: f"SELECT data, m, v, crc FROM {table} ORDER BY {', '.join(keys)}"
            for table, keys in KEY_COLUMNS.items()}


def row_crc(data, m, v):
    """The checksum of one stored row (zlib's CRC-32 of data || m || v)."""
    return zlib.crc32(v, zlib.crc32(m, zlib.crc32(data)))


def _stored(buf):
    """A buffer as the database holds it: little-endian float32 (no copy on
    little-endian hosts)."""
    return np.ascontiguousarray(buf, dtype="<f4")


def row_crcs(t):
    """row_crc of every stored row of parameter t (a vector is one row),
    computed by the kernel in one call."""
    out = np.empty(t.spec.rows, dtype=np.uint32)
    data, m, v = (fptr(_stored(buf)) for buf in (t.data, t.m, t.v))
    lib.crc32_rows(ffi.from_buffer("uint32_t[]", out), data, m, v, t.spec.rows, t.spec.cols)
    return out.tolist()


# A parameter set's rows as memoryviews, made once per set: its arenas never
# move, so the same views serve every checkpoint, and sqlite3 reads a
# memoryview through the buffer protocol with none of the per-call work a
# numpy view's buffer costs.
_ROW_COLUMNS = weakref.WeakKeyDictionary()


def _in_key_order(params):
    return sorted(params, key=lambda t: location(t.spec))


def _row_columns(params):
    """{table: [data, m, v, *key columns]}: per-table column lists, rows in
    the tables' key order (the order of SELECT ... ORDER BY the key)."""
    columns = _ROW_COLUMNS.get(params)
    if columns is not None:
        return columns
    columns = {table: [[] for _ in range(3 + len(keys))] for table, keys in KEY_COLUMNS.items()}
    in_place = True
    for t in _in_key_order(params):
        table, key = location(t.spec)
        stored = [_stored(buf) for buf in (t.data, t.m, t.v)]
        in_place &= all(s is buf for s, buf in zip(stored, (t.data, t.m, t.v)))
        n = t.spec.rows
        values = [list(map(memoryview, s.reshape(n, t.spec.cols))) for s in stored] + \
            [[k] * n for k in key] + [range(n)]
        for column, part in zip(columns[table], values):
            column.extend(part)
    if in_place:  # a big-endian host stores copies: those must be made afresh each time
        _ROW_COLUMNS[params] = columns
    return columns


def weight_rows(params, rowids=None):
    """{table: [(data, m, v, crc, *key, i)]}: every matrix row of every
    parameter, in key order; with rowids ({table: [rowid]} in key order),
    (data, m, v, crc, rowid, *key, i), as UPDATE_SQL takes them."""
    crcs = {table: [] for table in WEIGHT_TABLES}
    for t in _in_key_order(params):
        crcs[location(t.spec)[0]].extend(row_crcs(t))
    rows = {}
    for table, (data, m, v, *keys) in _row_columns(params).items():
        extra = [rowids[table]] if rowids else []
        rows[table] = list(zip(data, m, v, crcs[table], *extra, *keys))
    return rows


def table_rowids(conn, table):
    """The rowids of a weight table in key order."""
    return [r[0] for r in conn.execute(f"SELECT rowid FROM {table} "
                                       f"ORDER BY {', '.join(KEY_COLUMNS[table])}")]


# ---- errors and locks ----
@contextlib.contextmanager
def sqlite_errors(action):
    """Re-raise SQLite's errors (disk full, I/O error, locked, malformed file)
    as one-line SqlgptErrors that say what was being done."""
    try:
        yield
    except sqlite3.Error as e:
        raise SqlgptError(f"{action}: {e}") from None
    except UnicodeDecodeError:  # a damaged TEXT value
        raise SqlgptError(f"{action}: the database holds text that is not UTF-8") from None


class WriterLock:
    """An exclusive flock on the database file held by the one trainer: a
    second trainer is refused instead of interleaving checkpoints. (flock is
    independent of SQLite's own fcntl locks, so readers are unaffected.)"""

    def __init__(self, path):
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SqlgptError(f"cannot open {path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SqlgptError(f"{path} is being trained by another sqlgpt process") from None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def check_writable(path):
    """Training writes the file and creates -wal/-shm beside it."""
    path = Path(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise SqlgptError(f"{path} is read-only")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SqlgptError(f"cannot write in the directory of {path}")


# ---- opening ----
def _connect(path, readonly, immutable=False, prefix="", create=False):
    path = Path(path).resolve()
    uri = f"file:{quote(path.as_posix())}?mode={'ro' if readonly else 'rwc' if create else 'rw'}"
    if immutable:
        uri += "&immutable=1"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           factory=ModelConnection)
    conn.prefix = prefix
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA trusted_schema = OFF")  # never run functions a foreign schema names
    conn.execute("PRAGMA cell_size_check = ON")  # notice a malformed page early
    conn.execute("PRAGMA mmap_size = 0")         # read through SQLite's checks, not a map
    conn.execute(f"PRAGMA cache_size = -{READER_CACHE_KB if readonly else WRITER_CACHE_KB}")
    return conn


def _on_read_only_media(path):
    path = Path(path).resolve()
    return not os.access(path.parent, os.W_OK) and not Path(f"{path}-shm").exists()


def is_sqlgpt_file(path):
    """Whether path holds a SQLite database marked as sqlgpt's (header bytes only)."""
    try:
        with open(path, "rb") as f:
            header = f.read(72)
    except OSError:
        return False
    return header[:16] == b"SQLite format 3\x00" and \
        int.from_bytes(header[68:72], "big") == APPLICATION_ID


def _check_is_sqlite(path):
    path = Path(path)
    if not path.exists():
        raise SqlgptError(f"database {path} does not exist")
    if not path.is_file():
        raise SqlgptError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise SqlgptError(f"cannot read {path}: {e.strerror}") from None
    if header != b"SQLite format 3\x00":
        raise SqlgptError(f"{path} is not a SQLite database")


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


def _is_marked(conn):
    """Whether the file (or, with a prefix, its {prefix}schema table) says sqlgpt."""
    if not conn.prefix:
        return conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    table = f"{conn.prefix}{PREFIX_SCHEMA}"
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                        "AND name = ? COLLATE NOCASE", (table,)).fetchone():
        return False
    return conn.execute(f"SELECT value FROM {table} WHERE key = 'application'").fetchone() \
        == ("sqlgpt",)


def _refusal(path, prefix, marked, version, tables, extras):
    """Why an opened file cannot be used as a sqlgpt model (None if it can)."""
    if not marked:
        return f"{path} holds no sqlgpt model with the prefix {prefix!r}" if prefix else \
            f"{path} is not a sqlgpt database" + (
                " (a model inside an app's database is opened with --prefix)"
                if _model_prefixes_hint(tables) else "")
    if version > SCHEMA_VERSION:
        return (f"{path} has schema version {version}, newer than this sqlgpt "
                f"supports ({SCHEMA_VERSION}); upgrade sqlgpt")
    if version < 1:  # every sqlgpt file has had a version; none was 0
        return f"{path} is damaged: schema version {version}"
    missing = [prefix + t for t in tables_at(version) if t not in tables]
    if missing:
        return f"{path} is damaged: missing table(s) {', '.join(missing)}"
    if extras:  # sqlgpt creates none; a trigger could rewrite data when we write
        return (f"{path} has views or triggers sqlgpt did not create ({', '.join(extras)}); "
                f"refusing to use it")
    return None


def _model_prefixes_hint(tables):
    return any(name.endswith(PREFIX_SCHEMA) and name != PREFIX_SCHEMA for name in tables)


def close_writer(conn):
    """Close a writer's connection and leave one file at rest: back in
    rollback-journal mode, the WAL folded in and no -wal or -shm beside it
    (readers that open it later leave none either). While a reader still
    has the file open the switch cannot happen; it stays in WAL mode, whole,
    until a writer closes it alone."""
    if not getattr(conn, "prefix", ""):  # an app's file keeps its journal mode
        try:
            conn.execute("PRAGMA busy_timeout = 0")  # never wait on a reader here
            conn.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error:
            pass
    conn.close()


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


MIGRATIONS = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


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
            conn.execute("BEGIN IMMEDIATE")
            version = schema_version(conn)
            if version >= SCHEMA_VERSION:
                conn.execute("COMMIT")
                return False
            if version not in MIGRATIONS:
                raise SqlgptError(f"no migration from schema version {version}")
            MIGRATIONS[version](conn)
            _set_schema_version(conn, version + 1)
            conn.execute("COMMIT")
            return True
        except (sqlite3.Error, SqlgptError, UnicodeDecodeError) as e:
            _rollback(conn)
            step = f" from schema version {version} to {version + 1}" if version is not None \
                else ""
            raise SqlgptError(f"cannot migrate {path}{step} (the file is unchanged): "
                              f"{e}") from None
        except BaseException:
            _rollback(conn)
            raise


@contextlib.contextmanager
def _immediate(conn):
    """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back if
    anything in it fails."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn):
    if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
        conn.execute("ROLLBACK")


def create_database(path, model, train_cfg, tokenizer, state, overwrite=False,
                    token_counts=None, prefix=""):
    """Write a new database with the step-0 checkpoint, atomically: built
    under a temporary name, locked, then moved to `path` (replacing a file
    there only with overwrite); with prefix, the model's tables added to
    the (app's) database at path in one transaction. model: .arch (an
    ArchConfig) and .params (its ParameterSet); token_counts: each id's
    occurrences in the corpus (n_ids integers) or None. Returns (connection,
    writer lock)."""
    if prefix:
        return _create_in_app(path, model, train_cfg, tokenizer, state, overwrite, token_counts,
                              check_prefix(prefix))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    lock = None
    try:
        conn = sqlite3.connect(tmp, isolation_level=None, factory=ModelConnection)
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(schema_sql())
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("BEGIN")
        _new_model_rows(conn, model, tokenizer, token_counts)
        conn.execute("COMMIT")
        save_checkpoint(conn, model, train_cfg, state, train_loss=None, val_loss=None)
        conn.close()  # folds the WAL into the file, so the move takes everything
        lock = WriterLock(tmp)  # the lock is on the file itself: it moves with it
        if overwrite:
            for stale in (Path(f"{path}-wal"), Path(f"{path}-shm")):
                stale.unlink(missing_ok=True)
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another process created path meanwhile
                tmp.unlink()
            except FileExistsError:
                raise SqlgptError(f"{path} appeared while the model was being created "
                                  f"(another sqlgpt train?); nothing was written") from None
            except OSError:  # no hard links on this filesystem
                if path.exists():
                    raise SqlgptError(f"{path} appeared while the model was being created; "
                                      f"nothing was written") from None
                os.replace(tmp, path)
    except BaseException:
        if lock:
            lock.release()
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    return open_database(path, readonly=False), lock


def _new_model_rows(conn, model, tokenizer, token_counts):
    """A new model's vocabulary, tokenizer and weight rows (inside a transaction)."""
    counts = [None] * tokenizer.n_ids if token_counts is None else [int(c) for c in token_counts]
    conn.executemany("INSERT INTO vocab (id, token, bytes, count) VALUES (?, ?, ?, ?)",
                     [(*row, counts[row[0]]) for row in tokenizer.vocab_rows()])
    conn.executemany("INSERT INTO tokenizer (key, value) VALUES (?, ?)",
                     [("kind", tokenizer.kind), *tokenizer.state().items()])
    for table, rows in weight_rows(model.params).items():  # the rows checkpoints rewrite
        conn.executemany(INSERT_SQL[table], rows)


def model_names(prefix):
    """Every table and view name a model with this prefix has (or may have)."""
    return [prefix + name for name in (*VIEWS_ADDED_IN, *REQUIRED_TABLES, PREFIX_SCHEMA)]


def has_model(path, prefix):
    """Whether the SQLite file at path holds a sqlgpt model under prefix."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return False
    _check_is_sqlite(path)
    conn = _connect(path, readonly=True, prefix=prefix)
    try:
        with sqlite_errors(f"cannot read {path}"):
            return _is_marked(conn)
    finally:
        conn.close()


def _create_in_app(path, model, train_cfg, tokenizer, state, overwrite, token_counts, prefix):
    """The model's prefixed tables, rows and step-0 checkpoint added to the
    database at path (created if missing) in one transaction: the app's
    tables, its PRAGMAs and its journal mode are left as they are; with
    overwrite, a model under the same prefix is replaced (its names only)."""
    path = Path(path)
    created = not path.exists()
    if not created and path.stat().st_size:
        _check_is_sqlite(path)
        if is_sqlgpt_file(path):
            raise SqlgptError(f"{path} is a sqlgpt model file; --prefix puts a model inside "
                              f"an app's own database")
    conn = lock = None
    try:
        with sqlite_errors(f"cannot add the model to {path}"):
            conn = _connect(path, readonly=False, prefix=prefix, create=True)
            lock = WriterLock(path)
            with _durable(conn):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    _replace_prefixed(conn, path, prefix, overwrite)
                    for _, _, sql in schema_objects():
                        conn.execute(sql)  # under the prefixed names
                    conn.execute(f"CREATE TABLE {prefix}{PREFIX_SCHEMA} (key TEXT PRIMARY KEY, "
                                 f"value)")
                    conn.executemany(f"INSERT INTO {prefix}{PREFIX_SCHEMA} (key, value) "
                                     f"VALUES (?, ?)",
                                     [("application", "sqlgpt"), ("version", SCHEMA_VERSION)])
                    _new_model_rows(conn, model, tokenizer, token_counts)
                    _checkpoint_rows(conn, model, train_cfg, state, None, None)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
    except BaseException:
        if conn is not None:
            conn.close()
        if lock:
            lock.release()
        if created:
            for leftover in (path, Path(f"{path}-journal")):
                leftover.unlink(missing_ok=True)
        raise
    return conn, lock


def _replace_prefixed(conn, path, prefix, overwrite):
    """Refuse, or with overwrite drop, a model under prefix (inside the
    creating transaction). Tables of the model's names that are not a
    sqlgpt model's are the app's: always refused, never dropped."""
    found = {name.lower(): (name, kind) for name, kind in conn.execute(
        "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')")}
    present = [found[name] for name in model_names(prefix) if name in found]
    if present and not _is_marked(conn):
        raise SqlgptError(f"{path} already has tables named like the model's "
                          f"({', '.join(n for n, _ in present)}) that are not a sqlgpt model; "
                          f"choose another --prefix")
    if present and not overwrite:
        raise SqlgptError(f"{path} already holds a model with the prefix {prefix!r}; use "
                          f"--resume to continue training it or --overwrite to replace it")
    for name, kind in present:
        conn.execute(f'DROP {kind.upper()} "{name}"')


# ---- writing ----
def save_checkpoint(conn, model, train_cfg, state, train_loss, val_loss):
    """One transaction: config (the architecture and train_cfg), every weight
    row with its moments, the training state and a checkpoints row. All of it
    commits, or none of it."""
    with sqlite_errors("cannot save the checkpoint (the previous one is intact)"), \
            _durable(conn):
        _write_checkpoint(conn, model, train_cfg, state, train_loss, val_loss)


@contextlib.contextmanager
def _durable(conn):
    """synchronous FULL for this commit: in WAL mode NORMAL may lose the last
    commits on power loss, and checkpoints are rare enough to fsync each one."""
    before = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.execute("PRAGMA synchronous = FULL")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA synchronous = {int(before)}")


def _write_checkpoint(conn, model, train_cfg, state, train_loss, val_loss):
    with _immediate(conn):
        _checkpoint_rows(conn, model, train_cfg, state, train_loss, val_loss)


def _checkpoint_rows(conn, model, train_cfg, state, train_loss, val_loss):
    """Everything a checkpoint writes (inside its transaction)."""
    rowids = {table: table_rowids(conn, table) for table in WEIGHT_TABLES}
    rows = weight_rows(model.params, rowids)
    lora = getattr(model, "lora", None)
    conn.executemany("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)",
                     to_rows(model.arch, train_cfg) + (lora.rows() if lora else []))
    for table in WEIGHT_TABLES:
        expected = len(_row_columns(model.params)[table][0])
        if len(rowids[table]) != expected or \
                conn.executemany(UPDATE_SQL[table], rows[table]).rowcount != expected:
            raise SqlgptError(f"the {table} table does not have the model's rows")
    conn.executemany("INSERT OR REPLACE INTO train_state (key, value) VALUES (?, ?)",
                     [(k, json.dumps(v)) for k, v in state.items()])
    conn.execute("INSERT OR REPLACE INTO checkpoints (step, train_loss, val_loss, elapsed_s) "
                 "VALUES (?, ?, ?, ?)",
                 (state["step"], train_loss, val_loss, state["elapsed_s"]))
    conn.executemany(TENSOR_STATS_SQL, tensor_stats(model.params, state["step"]))
    keep_checkpoints(conn, model.params, state["step"], train_cfg.keep)


def compact(path, out_path, prefix=""):
    """Write out_path: a copy of the database at path with only what using
    the model needs, the latest weights without Adam's moments (and no kept
    checkpoints), so about a third of the size; config, tokenizer, metrics,
    evaluations, checkpoints and tensor_stats rows stay. train_state says compacted: it
    generates, evaluates and fine-tunes (--init-from) but cannot resume.
    With prefix, the copy is a model file of its own: the model's tables
    under their plain names, none of the app's. Built under a temporary name
    and moved into place."""
    path, out_path = Path(path), Path(out_path)
    if out_path.exists():
        raise SqlgptError(f"{out_path} already exists; name a new file")
    if not out_path.parent.is_dir():
        raise SqlgptError(f"cannot write {out_path}: {out_path.parent} is not a directory")
    source = open_database(path, prefix=prefix)  # a sqlgpt database this version reads
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    dest = None
    try:
        with sqlite_errors(f"cannot compact {path} into {out_path}"):
            dest = sqlite3.connect(f"file:{quote(str(tmp.resolve()))}", uri=True,
                                   isolation_level=None)
            if prefix:
                _copy_prefixed(source, path, prefix, dest)
            else:
                source.backup(dest)
            source.close()
            dest.execute("PRAGMA journal_mode = DELETE")
            migrate(dest, out_path)  # an older source: the copy at this version
            dest.execute("BEGIN")
            for table in WEIGHT_TABLES:
                rows = dest.execute(f"SELECT rowid, data FROM {table}").fetchall()
                dest.executemany(f"UPDATE {table} SET m = x'', v = x'', crc = ? WHERE rowid = ?",
                                 [(zlib.crc32(data), rowid) for rowid, data in rows])
            dest.execute("DELETE FROM checkpoint_weights")
            dest.execute("INSERT OR REPLACE INTO train_state (key, value) VALUES ('compacted', "
                         "'true')")
            dest.execute("COMMIT")
            dest.execute("VACUUM")
            dest.close()
            dest = None
        try:
            os.replace(tmp, out_path)
        except OSError as e:
            raise SqlgptError(f"cannot write {out_path}: {e.strerror}") from None
    finally:
        source.close()
        if dest is not None:
            dest.close()
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


def write_merged(path, out_path, arch, weights, prefix=""):
    """Write out_path: a compacted copy (see compact) of the LoRA fine-tune at
    path whose weights are `weights` ({name: float32 array}, the base with
    the adapters folded in, every stored tensor of arch) and whose config no
    longer names adapters or a base: a plain model, with the fine-tune's
    history. Built under a temporary name and moved into place."""
    out_path = Path(out_path)
    if out_path.exists():
        raise SqlgptError(f"{out_path} already exists; name a new file")
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.merge")
    try:
        compact(path, tmp, prefix)
        with sqlite_errors(f"cannot write {out_path}"):
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("BEGIN")
                conn.execute("DELETE FROM config WHERE key LIKE 'lora\\_%' ESCAPE '\\'")
                for table in WEIGHT_TABLES:
                    conn.execute(f"DELETE FROM {table}")
                # the latest checkpoint's statistics are the merged matrices', not the adapters'
                step = conn.execute("SELECT max(step) FROM checkpoints").fetchone()[0] or 0
                conn.execute("DELETE FROM tensor_stats WHERE step = ?", (step,))
                params = ParameterSet(stored_tensors(arch), buffers=("data",))
                for t in params:
                    t.data[...] = weights[t.name]
                conn.executemany(TENSOR_STATS_SQL, tensor_stats(params, step))
                for spec in stored_tensors(arch):
                    table, key = location(spec)
                    rows = np.ascontiguousarray(weights[spec.name], dtype="<f4").reshape(
                        spec.rows, spec.cols)
                    conn.executemany(INSERT_SQL[table], [
                        (row.tobytes(), b"", b"", zlib.crc32(row.tobytes()), *key, i)
                        for i, row in enumerate(rows)])
                conn.execute("COMMIT")
                conn.execute("VACUUM")
            finally:
                conn.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_prefixed(source, path, prefix, dest):
    """A prefixed model's tables, in one snapshot, into the empty model file
    dest under their plain names."""
    version = schema_version(source)
    if version != SCHEMA_VERSION:
        raise SqlgptError(f"the model in {path} has schema version {version}: train it once "
                          f"(--resume) with this sqlgpt to migrate it, then compact it")
    dest.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    dest.executescript(schema_sql())
    dest.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    dest.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    dest.execute("ATTACH DATABASE ? AS source",
                 (f"file:{quote(str(Path(path).resolve()))}?mode=ro",))
    try:
        dest.execute("BEGIN")
        for table in tables_at(SCHEMA_VERSION):
            columns = ", ".join(row[1] for row in dest.execute(f"PRAGMA main.table_info({table})"))
            dest.execute(f'INSERT INTO main.{table} ({columns}) SELECT {columns} '
                         f'FROM source."{prefix}{table}"')
        dest.execute("COMMIT")
    except BaseException:
        _rollback(dest)
        raise
    finally:
        dest.execute("DETACH DATABASE source")


def keep_checkpoints(conn, params, step, keep):
    """With keep > 0: this checkpoint's weights into checkpoint_weights, and
    only the last keep checkpoints there, plus the best by validation loss,
    kept (keep 0 keeps none). Inside the checkpoint's transaction."""
    if keep > 0:
        conn.executemany("INSERT OR REPLACE INTO checkpoint_weights (step, name, i, data, crc) "
                         "VALUES (?, ?, ?, ?, ?)", _history_rows(params, step))
    conn.execute("""
        DELETE FROM checkpoint_weights WHERE step NOT IN (
            SELECT step FROM (SELECT DISTINCT step FROM checkpoint_weights
                              ORDER BY step DESC LIMIT ?)
            UNION
            SELECT step FROM (SELECT step FROM checkpoints
                              WHERE val_loss IS NOT NULL AND step IN
                                  (SELECT DISTINCT step FROM checkpoint_weights)
                              ORDER BY val_loss, step LIMIT 1)
            WHERE ? > 0)""", (keep, keep))


def _history_rows(params, step):
    for t in params:
        rows = _stored(t.data).reshape(t.spec.rows, t.spec.cols)
        for i, row in enumerate(rows):
            data = row.tobytes()
            yield step, t.name, i, data, zlib.crc32(data)


def kept_steps(conn):
    """The steps whose weights checkpoint_weights holds, in order."""
    version = schema_version(conn)
    if "checkpoint_weights" not in tables_at(version):
        return []
    return [s for s, in conn.execute("SELECT DISTINCT step FROM checkpoint_weights "
                                     "ORDER BY step")]


def read_kept_weights(conn, model, step):
    """Fill model.params' data with a kept checkpoint's weights (moments
    zero), checking every row's presence, length and checksum."""
    rows = {}
    for name, i, data, crc in conn.execute("SELECT name, i, data, crc FROM checkpoint_weights "
                                           "WHERE step = ? ORDER BY name, i", (step,)):
        rows.setdefault(name, []).append((i, data, crc))
    unknown = sorted(set(rows) - set(model.params.tensors))
    if unknown:
        raise SqlgptError(f"checkpoint {step} has weights for unknown tensor(s): "
                          f"{', '.join(unknown)}")
    for t in model.params:
        found = rows.get(t.name, [])
        if [i for i, _, _ in found] != list(range(t.spec.rows)):
            raise SqlgptError(f"checkpoint {step}: weights of {t.name} are damaged: expected "
                              f"rows 0..{t.spec.rows - 1}, found {len(found)}")
        for i, data, crc in found:
            if not isinstance(data, bytes) or len(data) != 4 * t.spec.cols:
                raise SqlgptError(f"checkpoint {step}: weights of {t.name} are damaged: row {i} "
                                  f"is not {t.spec.cols} float32 values")
            if zlib.crc32(data) != crc:
                raise SqlgptError(f"checkpoint {step}: weights of {t.name} are damaged: row {i} "
                                  f"fails its checksum")
        t.data[...] = np.frombuffer(b"".join(d for _, d, _ in found), "<f4").reshape(t.shape)
        t.m[...], t.v[...] = 0.0, 0.0
    _check_values(model.params)


TENSOR_STATS_SQL = ("INSERT OR REPLACE INTO tensor_stats (step, name, layer, component, rows, "
                    "cols, mean, std, min, max, l2) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def tensor_stats(params, step):
    """tensor_stats rows of every parameter (values in float64 sums)."""
    rows = []
    for t in params:
        values = t.data.reshape(-1).astype(np.float64)
        mean = float(values.mean())
        rows.append((step, t.name, t.spec.layer, t.spec.component, t.spec.rows, t.spec.cols,
                     mean, float(np.sqrt(np.mean((values - mean) ** 2))), float(values.min()),
                     float(values.max()), float(np.sqrt(np.dot(values, values)))))
    return rows


def write_evaluation(conn, step, evaluation):
    """One evaluation's row, in its own small transaction."""
    with sqlite_errors("cannot write the evaluation"):
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO evaluations (step, loss, perplexity, accuracy, "
                         "tokens) VALUES (?, ?, ?, ?, ?)",
                         (step, evaluation.loss, evaluation.perplexity, evaluation.accuracy,
                          evaluation.tokens))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def write_metrics(conn, rows):
    """rows: (step, loss, lr, tokens_per_sec, grad_norm) tuples, in one small transaction."""
    if not rows:
        return
    with sqlite_errors("cannot write training metrics"):
        _write_metrics(conn, rows)


def _write_metrics(conn, rows):
    with _immediate(conn):
        conn.executemany("INSERT OR REPLACE INTO metrics (step, loss, lr, tokens_per_sec, "
                         "grad_norm) VALUES (?, ?, ?, ?, ?)", rows)


# ---- reading, validating everything ----
def read_config(conn):
    """(ArchConfig, TrainConfig) from the config table, validated (a version-1
    table has no architecture keys: from_rows reads it as the lua preset)."""
    try:
        return from_rows(dict(conn.execute("SELECT key, value FROM config")))
    except (sqlite3.DatabaseError, TypeError) as e:
        raise SqlgptError(f"the config table is damaged: {e}") from None


def read_tokenizer(conn, arch, train_cfg):
    """The tokenizer from the vocab and tokenizer tables (a version-1 file,
    read without migrating it: the word tokenizer's (word, id) rows), validated, with exactly as many
    ids as the model has embedding rows (each id indexes wte in C)."""
    version = schema_version(conn)
    try:
        if version < 2:
            rows = conn.execute("SELECT id, word, NULL FROM vocab").fetchall()
            state, kind = {}, "word"
        else:
            rows = conn.execute("SELECT id, token, bytes FROM vocab").fetchall()
            state = dict(conn.execute("SELECT key, value FROM tokenizer"))
            kind = state.pop("kind", None)
    except sqlite3.DatabaseError as e:
        raise SqlgptError(f"the vocab table is damaged: {e}") from None
    if kind != train_cfg.tokenizer:
        raise SqlgptError(f"the tokenizer table says {kind!r} but config says "
                          f"{train_cfg.tokenizer!r}")
    tokenizer = from_storage(kind, rows, state)
    if tokenizer.n_ids != arch.n_vocab:
        raise SqlgptError(f"the tokenizer has {tokenizer.n_ids} token ids but the model has "
                          f"n_vocab {arch.n_vocab}")
    if kind == "word" and tokenizer.vocab_size != train_cfg.vocab_size:
        raise SqlgptError(f"the vocab table has {tokenizer.vocab_size} words but config says "
                          f"vocab_size {train_cfg.vocab_size}")
    return tokenizer


def weight_tables(conn):
    """The weight tables this database's schema version has (a version-1
    file, read as it is, has no norms table: it has no such tensors)."""
    version = schema_version(conn)
    return [t for t in WEIGHT_TABLES if t in tables_at(version)]


def read_weights(conn, model):
    """Fill every parameter of model.params with data, m and v from the
    weight tables, checking that each one has exactly its rows and every BLOB
    exactly its length, and that no rows belong to no parameter. Call inside
    a transaction: the reads of a table must see one snapshot."""
    found = {}
    try:
        for table in weight_tables(conn):
            groups = conn.execute(GROUPS_SQL[table]).fetchall()
            rows = conn.execute(ROWS_SQL[table]).fetchall()
            start = 0
            for *key, count, distinct, first, last, non_integers in groups:
                if count:  # an empty head table still gives its one aggregate row
                    index_range = (first, last) if distinct == count and not non_integers \
                        else None
                    found[table, tuple(key)] = (rows[start:start + count], index_range)
                start += count
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read weights: {e}") from None
    params = {location(t.spec): t for t in model.params}
    unknown = [describe(*loc) for loc in found if loc not in params]
    if unknown:
        raise SqlgptError(f"weights for unknown parameter(s): {', '.join(sorted(unknown))}")
    for loc, t in params.items():
        _fill(t, *found.get(loc, ([], None)))
    _check_values(model.params)


def _check_values(params):
    """Every weight and moment finite, every second moment >= 0. The fast
    test is one dot product per arena (finite whenever every value is, short
    of float32 overflow); only when it fails are the parameters searched."""
    arenas = params.arenas
    with np.errstate(over="ignore"):
        quick = all(math.isfinite(np.dot(arenas[b], arenas[b])) for b in ("data", "m", "v"))
    if quick and arenas["v"].min() >= 0:
        return
    for t in params:
        if not (np.isfinite(t.data).all() and np.isfinite(t.m).all() and np.isfinite(t.v).all()):
            raise SqlgptError(f"weights of {t.name} contain NaN or Inf")
        if (t.v < 0).any():
            raise SqlgptError(f"weights of {t.name} are damaged: negative Adam second moment")


def _fill(t, rows, index_range):
    """Copy one parameter's rows (data, m, v, crc), whose distinct integer
    indices span index_range (first, last; None if they are not such), into
    its buffers. This is the hot path of every load: the whole copy and its
    checksums come first, and only when they fail are the rows examined one
    by one, to say what is wrong."""
    nrows, ncols = t.spec.rows, t.spec.cols
    if len(rows) != nrows or (nrows and index_range != (0, nrows - 1)):
        raise SqlgptError(f"weights of {t.name} are damaged: expected rows 0..{nrows - 1}, "
                          f"found {len(rows)}")
    data, m, v, crc = zip(*rows) if rows else ((),) * 4
    try:
        columns = [b"".join(column) for column in (data, m, v)]  # refuses what is not bytes
    except TypeError:
        columns = None
    if columns and len(columns[0]) == 4 * t.data.size and columns[1] == columns[2] == b"":
        # a compacted file (sqlgpt compact): no moments, each crc over data alone
        t.data[...] = np.frombuffer(columns[0], dtype="<f4").reshape(t.shape)
        t.m[...], t.v[...] = 0.0, 0.0
        bad = [i for i, (row, c) in enumerate(zip(data, crc)) if zlib.crc32(row) != c]
        if not bad:
            return
        raise SqlgptError(f"weights of {t.name} are damaged: row {bad[0]} fails its checksum")
    if columns and all(len(c) == 4 * t.data.size for c in columns):
        for column, buf in zip(columns, (t.data, t.m, t.v)):
            buf[...] = np.frombuffer(column, dtype="<f4").reshape(t.shape)
        if row_crcs(t) == list(crc):  # over the copied rows: the same bytes, in one call
            return
    for column in (data, m, v):
        if set(map(type, column)) != {bytes} or set(map(len, column)) != {4 * ncols}:
            raise SqlgptError(f"weights of {t.name} are damaged: a row is not {ncols} "
                              f"float32 values")
    bad = next(i for i, (a, b) in enumerate(zip(row_crcs(t), crc)) if a != b)
    raise SqlgptError(f"weights of {t.name} are damaged: row {bad} fails its checksum")


def write_quantized(conn, bits, group, step, blocks):
    """Replace the quantized rows of this bits by blocks ({tensor name: (q
    (OC, row bytes) uint8, scales (OC, C/group) float32)}) made from the
    checkpoint at step, in one transaction."""
    rows = []
    for name, (q, scales) in blocks.items():
        scales = np.ascontiguousarray(scales, dtype="<f4")
        for i in range(q.shape[0]):
            qb, sb = q[i].tobytes(), scales[i].tobytes()
            rows.append((name, bits, group, step, i, qb, sb, zlib.crc32(sb, zlib.crc32(qb))))
    with _immediate(conn):
        conn.execute("DELETE FROM quantized WHERE bits = ?", (bits,))
        conn.executemany("INSERT INTO quantized (tensor, bits, group_size, step, i, q, scales, "
                         "crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)


def quantized_sets(conn):
    """{bits: (group_size, step)} of the quantized copies a database holds
    (none before version 4)."""
    if schema_version(conn) < ADDED_IN["quantized"]:
        return {}
    with sqlite_errors("cannot read the quantized table"):
        found = conn.execute("SELECT bits, min(group_size), max(group_size), min(step), "
                             "max(step) FROM quantized GROUP BY bits").fetchall()
    for bits, g0, g1, s0, s1 in found:
        if g0 != g1 or s0 != s1:
            raise SqlgptError(f"the int{bits} weights are damaged: their rows disagree on the "
                              f"group size or step")
    return {bits: (group, step) for bits, group, _, step, _ in found}


def read_quantized(conn, shapes, bits):
    """{name: (q, scales)} of the int`bits` copy, for shapes ({name: (C,
    OC)}, every quantized matrix), each row checked: its length, its
    checksum, finite scales, and no rows missing or extra."""
    group, _ = quantized_sets(conn)[bits]
    if group not in (32, 64) or any(C % group for C, _ in shapes.values()):
        raise SqlgptError(f"the int{bits} weights are damaged: group size {group!r} does not "
                          f"fit the model's matrices")
    row_bytes = {8: 1.0, 4: 0.5}[bits]
    with sqlite_errors("cannot read the quantized table"):
        rows = conn.execute("SELECT tensor, i, q, scales, crc FROM quantized WHERE bits = ? "
                            "ORDER BY tensor, i", (bits,)).fetchall()
    by_name = {}
    for name, i, q, scales, crc in rows:
        by_name.setdefault(name, []).append((i, q, scales, crc))
    unknown = sorted(set(by_name) - set(shapes))
    if unknown:
        raise SqlgptError(f"int{bits} weights for unknown tensor(s): {', '.join(unknown)}")
    blocks = {}
    for name, (C, OC) in shapes.items():
        found = by_name.get(name, [])
        if [r[0] for r in found] != list(range(OC)):
            raise SqlgptError(f"the int{bits} weights of {name} are damaged: expected rows "
                              f"0..{OC - 1}, found {len(found)}")
        for i, q, scales, crc in found:
            if not (isinstance(q, bytes) and isinstance(scales, bytes)
                    and len(q) == int(C * row_bytes) and len(scales) == 4 * (C // group)):
                raise SqlgptError(f"the int{bits} weights of {name} are damaged: row {i} has "
                                  f"the wrong length")
            if zlib.crc32(scales, zlib.crc32(q)) != crc:
                raise SqlgptError(f"the int{bits} weights of {name} are damaged: row {i} fails "
                                  f"its checksum")
        q = np.frombuffer(b"".join(r[1] for r in found), dtype=np.uint8).reshape(OC, -1)
        scales = np.frombuffer(b"".join(r[2] for r in found), dtype="<f4").reshape(OC, -1)
        if not np.isfinite(scales).all():
            raise SqlgptError(f"the int{bits} weights of {name} have NaN or Inf scales")
        blocks[name] = (q, scales.astype(np.float32))
    return group, blocks


def read_train_state(conn):
    try:
        return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM train_state")}
    except (sqlite3.DatabaseError, TypeError, ValueError, RecursionError) as e:
        raise SqlgptError(f"the train_state table is damaged: {type(e).__name__}") from None


def integrity_check(path, prefix=""):
    """SQLite's own check of the file's structure: a list of problems, empty if none."""
    conn = open_database(path, prefix=prefix)
    try:
        with sqlite_errors(f"cannot check {path}"):
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    return [] if rows == ["ok"] else rows


def checkpoints(conn):
    rows = [dict(zip(("step", "train_loss", "val_loss", "elapsed_s", "created_at"), row))
            for row in conn.execute("SELECT step, train_loss, val_loss, elapsed_s, created_at "
                                    "FROM checkpoints ORDER BY step")]
    for row in rows:
        losses_ok = all(row[k] is None or isinstance(row[k], (int, float))
                        for k in ("train_loss", "val_loss", "elapsed_s"))
        if not (isinstance(row["step"], int) and losses_ok):
            raise SqlgptError("the checkpoints table is damaged (wrong value types)")
    return rows

