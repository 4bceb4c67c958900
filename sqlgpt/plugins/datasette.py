"""Datasette plugin: the sqlgpt SQL functions on Datasette's connections.

    # datasette.yaml (or metadata.json's "plugins" on Datasette 0.x)
    plugins:
      sqlgpt:
        models:
          default: /path/to/model.db
          classifier: /path/to/clf.db

Each model is loaded once and shared by every connection (one call at a
time per model). The functions use the model named `default`, or the only
one; a call names another by one more, last argument:
`sqlgpt_generate('the king', 20, 0.8, 1, 'other')`. A call stops with an
error once it runs past Datasette's sql_time_limit_ms, as a query does.
"""
import threading

from datasette import hookimpl

from ..errors import SqlgptError
from ..sql.functions import ModelFunctions, SqlFunctionError, create_function, load

_loaded = {}                 # (path, precision) -> ModelFunctions, shared by every connection
_loading = threading.Lock()


def _models(datasette):
    """{name: ModelFunctions} of the plugin's configuration (loaded once)."""
    config = datasette.plugin_config("sqlgpt") or {}
    models = config.get("models") or {}
    if not isinstance(models, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in models.items()):
        raise SqlgptError("the sqlgpt plugin's models must be a mapping of names to paths")
    precision = config.get("precision", "fp32")
    out = {}
    with _loading:
        for name, path in models.items():
            key = (path, precision)
            if key not in _loaded:
                _loaded[key] = ModelFunctions(load(path, precision))
            out[name] = _loaded[key]
    return out


def _default(models):
    if "default" in models:
        return "default"
    return next(iter(models)) if len(models) == 1 else None


def _dispatch(conn, models, name, limit_s):
    """The SQL function `name` over the named models: the default one, or
    the one a last extra argument names. A call past the time limit
    interrupts its statement, which Datasette then reports as a query that
    took too long (the standard library's sqlite3 shows a Python function's
    own errors only as "user-defined function raised exception")."""
    most = max(ModelFunctions.FUNCTIONS[name][1])
    calls = {model: functions.sql_function(name, limit_s) for model, functions in models.items()}
    default = _default(models)

    def call(*args):
        if len(args) > most:
            chosen, args = args[-1], args[:-1]
            if chosen not in calls:
                raise SqlFunctionError(f"{name}: no model named {chosen!r} (configured: "
                                       f"{', '.join(sorted(calls))})")
        elif default is None:
            raise SqlFunctionError(f"{name}: several models are configured and none is named "
                                   f"default: name one as the last argument")
        else:
            chosen = default
        try:
            return calls[chosen](*args)
        except SqlFunctionError as e:
            if "time limit" not in str(e):
                raise
            conn.interrupt()  # the statement ends as "interrupted" when this returns
            return None
    return call


@hookimpl
def prepare_connection(conn, database, datasette):
    models = _models(datasette)
    if not models:
        return
    limit_ms = datasette.setting("sql_time_limit_ms") or 0
    for name, (_, counts) in ModelFunctions.FUNCTIONS.items():
        if name == "sqlgpt_error":
            continue
        fn = _dispatch(conn, models, name, limit_ms / 1000 if limit_ms else None)
        for nargs in (*counts, max(counts) + 1):
            create_function(conn, name, nargs, fn, deterministic=name == "sqlgpt_tokens")
