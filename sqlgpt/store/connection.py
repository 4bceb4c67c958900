"""Opening a model's SQLite file: the table prefix of a model inside an app's
database, connections, the schema's version and objects, errors, the writer
lock and the transactions (immediate, durable) every write runs in."""
import contextlib
import fcntl
import functools
import os
import re
import sqlite3
from pathlib import Path
from urllib.parse import quote

from ..contract import APPLICATION_ID, PREFIX_KEYWORDS, PREFIX_MAX, SCHEMA_VERSION
from ..contract import WEIGHT_TABLE_SINCE, WEIGHT_TABLES as KEY_COLUMNS
from ..errors import SqlgptError


WEIGHT_TABLES = tuple(KEY_COLUMNS)
REQUIRED_TABLES = ("config", "vocab", "tokenizer", "train_state", "checkpoints",
                   "metrics", "evaluations", "tensor_stats", "checkpoint_weights",
                   "quantized", "labels", "classifier_evals",
                   "tensor_formats") + WEIGHT_TABLES
# the schema version that added a table (the others are in every version)
ADDED_IN = {**WEIGHT_TABLE_SINCE, "tokenizer": 2, "evaluations": 2, "tensor_stats": 3,
            "checkpoint_weights": 3, "quantized": 4, "labels": 5, "classifier_evals": 5,
            "tensor_formats": 6}
# the views sqlgpt creates, and the version that added each
VIEWS_ADDED_IN = {"tensors": 3}
_NAME_RE = re.compile(r"\b(" + "|".join(PREFIX_KEYWORDS) + r")(\s+)("
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
PREFIX_RE = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,{PREFIX_MAX - 1}}}")
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
    if getattr(conn, "prefix", ""):  # compact migrates a plain connection's copy
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


@contextlib.contextmanager
def atomic(conn):
    """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back if
    anything in it fails: every write sqlgpt makes goes through here."""
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

