"""The model from SQL: sqlgpt's functions on an app's own connection, and
connections with sqlite-vec loaded.

    import sqlite3, sqlgpt
    conn = sqlite3.connect("app.db")
    sqlgpt.register(conn, "model.db")
    conn.execute("SELECT sqlgpt_generate('the king', 20, 0.8, 1)").fetchone()

Each register() loads the model once; its functions may be called from any
thread (one call at a time per registration: generation keeps a KV cache).
Errors are SQL errors. The standard library's sqlite3 replaces a function's
message with "user-defined function raised exception"; `sqlgpt_error()`
returns the message of the last failure on that registration, and apsw
connections (which sqlgpt.connect falls back to) show it directly.
"""
import json
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..api import load
from ..data import safe_json
from ..errors import SqlgptError
from ..train.evaluate import evaluate

MAX_TOKENS = 4096          # sqlgpt_generate's cap: a query must not run for hours
MAX_TEXT_CHARS = 10**7     # longer arguments are refused before tokenizing
DEFAULT_MAX_TOKENS = 50
PROBE_EVERY_S = 0.005      # how often a long call asks whether the host interrupted it


class SqlFunctionError(Exception):
    """A refused call of a SQL function (its message names the function)."""


def _text(name, value, what="text"):
    if value is None:
        raise SqlFunctionError(f"{name}: {what} is NULL")
    if not isinstance(value, str):
        raise SqlFunctionError(f"{name}: {what} must be TEXT, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise SqlFunctionError(f"{name}: {what} is longer than {MAX_TEXT_CHARS:,} characters")
    return value


def _integer(name, value, what, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SqlFunctionError(f"{name}: {what} must be an integer from {low} to {high:,}, "
                               f"got {value!r}")
    return value


def _check_sampling(name, max_tokens, temperature, seed):
    _integer(name, max_tokens, "max_tokens", 0, MAX_TOKENS)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or \
            not 0 <= temperature <= 100:
        raise SqlFunctionError(f"{name}: temperature must be a number from 0 to 100, "
                               f"got {temperature!r}")
    if seed is not None:
        _integer(name, seed, "seed", 0, 2**63 - 1)


# the same arguments give the same value (a classifier's labels have no sampling)
DETERMINISTIC = ("sqlgpt_tokens", "sqlgpt_classify", "sqlgpt_classify_scores")


class ModelFunctions:
    """One loaded model and the SQL functions over it."""

    def __init__(self, model, interrupted=None):
        """interrupted: a callable saying whether the host interrupted the
        statement a call runs in (its connection's interrupt()), asked now
        and then during long calls, which then stop with an error."""
        self.model = model
        self.lock = threading.Lock()
        self._errors = threading.local()  # each thread's last error: its own, never another's
        self._interrupted = interrupted or (lambda: False)
        self._asked = 0.0
        self._deadline = self._limit_s = None

    def _check(self, name):
        """Stop the call if the host interrupted it (asked at most every
        PROBE_EVERY_S, so a probe costs nothing next to the work)."""
        now = time.monotonic()
        if self._deadline is not None and now > self._deadline:
            raise SqlFunctionError(f"{name}: ran past the host's time limit of "
                                   f"{self._limit_s * 1000:,.0f} ms (ask for less: fewer "
                                   f"max_tokens, a shorter text)")
        if now - self._asked >= PROBE_EVERY_S:
            self._asked = now
            if self._interrupted():
                raise SqlFunctionError(f"{name}: interrupted")

    # ---- the functions, each (name, argument counts, implementation) ----
    def generate(self, prompt, max_tokens=DEFAULT_MAX_TOKENS, temperature=1.0, seed=None):
        """The continuation of prompt (the generated text only)."""
        name = "sqlgpt_generate"
        prompt = _text(name, prompt, "prompt")
        _check_sampling(name, max_tokens, temperature, seed)
        model = self.model
        prompt_ids = [int(i) for i in model.prompt_ids(prompt)]
        new = []
        for token in model.generate_ids(prompt, max_tokens, float(temperature), seed=seed):
            new.append(token)
            self._check(name)
        # the text the new tokens add (decoding them together with the prompt
        # keeps a character split across the boundary whole)
        prompt_text = model.decode(prompt_ids)
        text = model.decode(prompt_ids + new)
        return text[len(prompt_text):] if text.startswith(prompt_text) else model.decode(new)

    def chat(self, messages, max_tokens=DEFAULT_MAX_TOKENS, temperature=1.0, seed=None):
        """The assistant's reply to messages (a JSON array of {"role",
        "content"} objects), rendered by the model's chat template."""
        name = "sqlgpt_chat"
        try:
            messages = safe_json.loads(_text(name, messages, "messages"), "messages")
        except SqlgptError as e:
            raise SqlFunctionError(f"{name}: {e}") from None
        _check_sampling(name, max_tokens, temperature, seed)
        pieces = []
        for piece in self.model.chat_stream(messages, max_tokens, float(temperature), seed=seed):
            pieces.append(piece)
            self._check(name)
        return "".join(pieces)

    def tokens(self, text):
        """The token ids of text, as a JSON array."""
        text = _text("sqlgpt_tokens", text)
        return json.dumps([int(i) for i in self.model.encode(text)])

    def _scored_ids(self, name, text):
        """text's ids, after <eos> (a document's start) where the tokenizer has one."""
        ids = [int(i) for i in self.model.encode(_text(name, text))]
        eos = self.model.tokenizer.eos_id
        return np.asarray(([eos] if eos is not None else []) + ids, dtype=np.int64)

    def logprob(self, text):
        """The natural-log probability of text: the sum over its tokens of
        log p(token | the tokens before it, up to the context), the first
        token after <eos> (with the word tokenizer, which has none, the
        first token is context only). NULL when nothing is scored."""
        ids = self._scored_ids("sqlgpt_logprob", text)
        if len(ids) < 2:
            return None
        result = evaluate(self.model._gpt, ids, batch_size=4,  # half-context stride
                          on_progress=lambda done, total: self._check("sqlgpt_logprob"))
        return -result.loss * result.tokens

    def embed(self, text):
        """The mean of the final hidden states (after the final norm, where
        the model has one) over text's tokens, in windows of the context:
        a float32 BLOB of embed_dim values, the layout sqlite-vec reads."""
        ids = self.model.encode(_text("sqlgpt_embed", text))
        if not len(ids):
            raise SqlFunctionError("sqlgpt_embed: the text has no tokens")
        vector = self.model.embed_ids(ids, on_window=lambda: self._check("sqlgpt_embed"))
        return vector.astype("<f4").tobytes()

    def classify(self, text):
        """A classifier's most probable label for text."""
        scores = self._label_scores("sqlgpt_classify", text)
        return max(scores, key=scores.get)

    def classify_scores(self, text):
        """A classifier's probability of each label for text, a JSON object
        {label: probability} in the labels' order."""
        return json.dumps(self._label_scores("sqlgpt_classify_scores", text))

    def _label_scores(self, name, text):
        text = _text(name, text)
        if not self.model.labels:
            raise SqlFunctionError(f"{name}: the model is not a classifier (fine-tune one "
                                   f"with --task classify)")
        return self.model.classify_scores(text)

    def error(self):
        """The message of the last failed call, or NULL."""
        return getattr(self._errors, "message", None)

    FUNCTIONS = {"sqlgpt_generate": ("generate", (1, 2, 3, 4)),
                 "sqlgpt_chat": ("chat", (1, 2, 3, 4)), "sqlgpt_tokens": ("tokens", (1,)),
                 "sqlgpt_logprob": ("logprob", (1,)), "sqlgpt_embed": ("embed", (1,)),
                 "sqlgpt_classify": ("classify", (1,)),
                 "sqlgpt_classify_scores": ("classify_scores", (1,)),
                 "sqlgpt_error": ("error", (0,))}

    def sql_function(self, name, limit_s=None):
        """The callable SQLite calls: one call at a time, every failure a
        SqlFunctionError whose message is kept for sqlgpt_error(); limit_s:
        the seconds a call may run (a host's time limit), else no limit."""
        method = getattr(self, self.FUNCTIONS[name][0])
        if name == "sqlgpt_error":
            return method

        def call(*args):
            with self.lock:
                self._deadline = None if limit_s is None else time.monotonic() + limit_s
                self._limit_s = limit_s
                try:
                    return method(*args)
                except SqlFunctionError as e:
                    message = str(e)
                except SqlgptError as e:
                    message = f"{name}: {e}"
                except MemoryError:
                    message = f"{name}: out of memory"
                except Exception as e:  # a host must see an SQL error, never a crash
                    message = f"{name}: {type(e).__name__}: {e}"
                self._errors.message = message
            raise SqlFunctionError(message)
        return call


EXTENSION = "sqlgpt0.so"


def extension_path():
    """Where the loadable SQLite extension (sqlgpt0.so, built with the
    package) is: `.load` it in the sqlite3 shell, or load_extension() it in
    any SQLite client, for sqlgpt's SQL functions without Python."""
    path = Path(__file__).resolve().parents[1] / EXTENSION  # beside the package's _kernel
    if not path.is_file():
        raise SqlgptError(f"the loadable extension {EXTENSION} was not built with this "
                          f"installation (SQLite's sqlite3ext.h was missing when it was "
                          f"installed: apt-get install libsqlite3-dev, then reinstall)")
    return str(path)


def register(conn, path, precision="fp32", prefix=""):
    """Add sqlgpt_generate, sqlgpt_chat, sqlgpt_tokens, sqlgpt_logprob, sqlgpt_embed,
    sqlgpt_classify, sqlgpt_classify_scores and sqlgpt_error to a connection (the standard library's sqlite3 or apsw),
    backed by the model in path (loaded now, read-only; prefix: the one kept
    under that table prefix, e.g. in the app's own database). Returns the
    ModelFunctions object (its .model is the loaded sqlgpt.Model)."""
    functions = ModelFunctions(load(path, precision, prefix=prefix), _interrupt_probe(conn))
    for name, (_, counts) in ModelFunctions.FUNCTIONS.items():
        fn = functions.sql_function(name)
        for nargs in counts:
            create_function(conn, name, nargs, fn, deterministic=name in DETERMINISTIC)
    return functions


def _interrupt_probe(conn):
    """Whether the statement running on conn was interrupted: apsw says so
    (Connection.is_interrupted); the standard library's sqlite3 cannot, so
    a one-row statement is run inside the call, which SQLite refuses with
    "interrupted" while the connection is."""
    if not hasattr(conn, "create_function"):  # apsw: no re-entry into the connection
        return lambda: bool(getattr(conn, "is_interrupted", False))

    def probe():
        try:
            conn.execute("SELECT 1").fetchone()
        except sqlite3.OperationalError as e:
            return "interrupt" in str(e)
        return False
    return probe


def create_function(conn, name, nargs, fn, deterministic):
    if hasattr(conn, "create_function"):  # the standard library
        conn.create_function(name, nargs, fn, deterministic=deterministic)
    else:  # apsw
        conn.create_scalar_function(name, fn, nargs, deterministic=deterministic)


# ---- connections with sqlite-vec ----
def can_load_extensions():
    """Whether this Python's sqlite3 can load SQLite extensions (pyenv's
    builds, for one, are made without)."""
    import sqlite3
    conn = sqlite3.connect(":memory:")
    try:
        return hasattr(conn, "enable_load_extension")
    finally:
        conn.close()


def connect(path, readonly=True, functions=True, precision="fp32", prefix=""):
    """A connection to the database at path with sqlite-vec loaded and, with
    functions, sqlgpt's SQL functions for the model it holds: the standard
    library's sqlite3 where it can load extensions, else an apsw connection
    (both have .execute(sql, params).fetchall()). Each statement commits by
    itself (autocommit), on both; one thread at a time may use it. prefix:
    the functions' model is the one under that table prefix."""
    import sqlite_vec
    path = Path(path)
    if not path.is_file():
        raise SqlgptError(f"database {path} does not exist")
    conn = _open(path, readonly)
    try:
        conn.enable_load_extension(True)
        if hasattr(conn, "create_function"):
            sqlite_vec.load(conn)
        else:
            conn.load_extension(sqlite_vec.loadable_path())
        conn.enable_load_extension(False)
        if functions:
            register(conn, path, precision, prefix)
    except BaseException:
        conn.close()
        raise
    return conn


def _open(path, readonly):
    """An autocommit connection: the standard library's, or apsw's."""
    if can_load_extensions():
        import sqlite3
        uri = f"file:{quote(path.resolve().as_posix())}?mode={'ro' if readonly else 'rw'}"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        import apsw
    except ImportError:
        raise SqlgptError("this Python's sqlite3 cannot load extensions and apsw is not "
                          "installed: pip install apsw, or use a Python built with "
                          "loadable SQLite extensions") from None
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    return apsw.Connection(str(path), flags=flags)
