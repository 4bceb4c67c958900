"""An app's own tables as a corpus: a query's rows read through a
connection that cannot change the app's file (mode=ro and query_only), each
row's first column one document's text."""
import sqlite3
from pathlib import Path
from urllib.parse import quote

from ..data.corpus import SqlSource
from ..errors import SqlgptError

FETCH_ROWS = 256


def open_read_only(path):
    """A connection that cannot change the database at path: the app's file
    stays byte for byte as it was."""
    path = Path(path)
    if not path.is_file():
        raise SqlgptError(f"--from {path} is not a file")
    try:
        # a generator over its rows may be resumed on another thread (the BPE trainer's)
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True,
                               check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise SqlgptError(f"cannot read {path} as a SQLite database: {e}") from None
    return conn


def query_texts(path, query):
    """Yield the text of each row's first column (NULL and empty rows
    skipped, numbers as text); a BLOB or a failing query is a one-line
    error."""
    for number, row in enumerate(_query_rows(path, query, 1), 1):
        value = row[0]
        if isinstance(value, (bytes, memoryview)):
            raise SqlgptError(f"row {number} of the --sql query is a BLOB, not text")
        if value is None or value == "":
            continue
        yield value if isinstance(value, str) else str(value)


def _query_rows(path, query, columns):
    """Yield the rows of query on the database at path, read-only; a query
    of fewer than `columns` columns, or one that fails, is a one-line error."""
    conn = open_read_only(path)
    try:
        try:
            cursor = conn.execute(query)
        except sqlite3.Error as e:
            raise SqlgptError(f"the --sql query failed on {path}: {e}") from None
        if not cursor.description:
            raise SqlgptError("the --sql query returns no rows: give a SELECT")
        if len(cursor.description) < columns:
            raise SqlgptError("a classifier's --sql query returns two columns: the text, then "
                              "its label")
        yield from _fetch(cursor, path)
    finally:
        conn.close()


def _fetch(cursor, path):
    while True:
        try:
            rows = cursor.fetchmany(FETCH_ROWS)
        except sqlite3.Error as e:
            raise SqlgptError(f"the --sql query failed on {path}: {e}") from None
        if not rows:
            return
        yield from rows


def sql_sources(query, database):
    """The corpus of a --sql query on the database at path, as sources."""
    if not isinstance(query, str) or not query.strip():
        raise SqlgptError("--sql needs a query")
    path = Path(database)
    open_read_only(path).close()
    return [SqlSource(path, f"--sql on {path}", 0, "", query, query_texts)]


def query_labelled(path, query):
    """Yield (text, label) of each row's first two columns, each as text; a
    row with a NULL, empty or BLOB value is a one-line error naming it."""
    for number, row in enumerate(_query_rows(path, query, 2), 1):
        for name, value in zip(("text", "label"), row[:2]):
            if isinstance(value, (bytes, memoryview)) or value is None or value == "":
                what = "a BLOB" if isinstance(value, (bytes, memoryview)) else "empty"
                raise SqlgptError(f"row {number} of the --sql query: its {name} is {what}")
        yield tuple(v if isinstance(v, str) else str(v) for v in row[:2])


def labelled_sql_source(query, database):
    """A classifier's rows from a --sql query (text, label) on the database."""
    if not isinstance(query, str) or not query.strip():
        raise SqlgptError("--sql needs a query")
    path = Path(database)
    open_read_only(path).close()
    return SqlSource(path, f"--sql on {path}", 0, "", query, query_labelled)
