"""Writing a model's database: creating it whole, checkpoints (one
transaction each), kept history, metrics and evaluations, quantized
copies, compacted and merged copies, and the checks of a whole file."""
import json
import os
import sqlite3
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..model.arch import stored_tensors
from ..model.config import to_rows
from ..errors import SqlgptError
from .classifier import write_labels
from ..model.tensor import ParameterSet
from .connection import (APPLICATION_ID, ModelConnection, PAGE_SIZE, PREFIX_SCHEMA,
                         REQUIRED_TABLES, SCHEMA_VERSION, VIEWS_ADDED_IN, WEIGHT_TABLES,
                         WriterLock, _check_is_sqlite, _connect, _durable, _is_marked, atomic,
                         check_prefix, is_sqlgpt_file, schema_objects, schema_sql,
                         schema_version, sqlite_errors, tables_at)
from .rows import (INSERT_SQL, TENSOR_STATS_SQL, UPDATE_SQL, _check_values, _row_columns, _stored,
                   location, read_formats, table_rowids, tensor_stats, weight_rows)
from .migrations import migrate, open_database


def create_database(path, model, train_cfg, tokenizer, state, overwrite=False,
                    token_counts=None, prefix="", labels=(), stored=None):
    """Write a new database with the step-0 checkpoint, atomically: built
    under a temporary name, locked, then moved to `path` (replacing a file
    there only with overwrite); with prefix, the model's tables added to
    the (app's) database at path in one transaction. model: .arch (an
    ArchConfig) and .params (its ParameterSet); token_counts: each id's
    occurrences in the corpus (n_ids integers) or None; labels: a
    classifier's label names by id; stored: an import's (formats, quantized),
    its tensors' formats (rows.formats_of) and the quantized copy (bits,
    group, blocks) that its integer ones are, written with the rest.
    Returns (connection, writer lock)."""
    if prefix:
        return _create_in_app(path, model, train_cfg, tokenizer, state, overwrite, token_counts,
                              check_prefix(prefix), labels, stored)
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
        with atomic(conn):
            _new_model_rows(conn, model, tokenizer, token_counts, labels, stored)
        save_checkpoint(conn, model, train_cfg, state, train_loss=None, val_loss=None)
        _fold_wal(conn, path)
        conn.close()
        _check_whole(tmp, path)
        lock = WriterLock(tmp)  # the lock is on the file itself: it moves with it
        placed = _place_new(tmp, path, overwrite)
        try:
            return open_database(path, readonly=False), lock
        except BaseException:
            if placed:  # the model made here and no one else's: gone whole, as it came
                for made in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    made.unlink(missing_ok=True)
            raise
    except BaseException:
        if lock:
            lock.release()
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        raise


def _fold_wal(conn, path):  # path: the name the user gave, for errors
    """Every page of the WAL written into the file and the WAL gone, or an
    error: closing a connection folds the WAL in too, but reports no
    failure (a full disk then leaves a file whose header counts pages it
    does not hold)."""
    with sqlite_errors(f"cannot create {path}"):
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
    if mode != "delete":
        raise SqlgptError(f"cannot create {path}: its write-ahead log could not be folded in "
                          f"(is the disk full?)")


def _check_whole(tmp, path):
    """The new file tmp holds every page its header counts (what a write cut
    short by a full disk would not)."""
    with sqlite_errors(f"cannot create {path}"):
        conn = sqlite3.connect(f"file:{quote(str(Path(tmp).resolve()))}?mode=ro", uri=True)
        try:
            pages, size = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                           for name in ("page_count", "page_size"))
        finally:
            conn.close()
    if pages * size != os.path.getsize(tmp) or Path(f"{tmp}-wal").exists():
        raise SqlgptError(f"cannot create {path}: the file was not written whole (is the disk "
                          f"full?)")


def _place_new(tmp, path, overwrite):
    """Move the whole new file tmp to path; True once it is there. Without
    overwrite, a file that appears at path meanwhile is never replaced."""
    if overwrite:
        for stale in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            stale.unlink(missing_ok=True)
        os.replace(tmp, path)
        return True
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
    return True


def _new_model_rows(conn, model, tokenizer, token_counts, labels=(), stored=None):
    """A new model's vocabulary, tokenizer, labels, tensor formats, quantized
    copy and weight rows (inside a transaction)."""
    formats, quantized = stored or ({}, None)
    conn.executemany("INSERT INTO tensor_formats (name, format) VALUES (?, ?)",
                     sorted(formats.items()))
    if quantized is not None:
        conn.executemany(QUANTIZED_INSERT_SQL, _quantized_rows(*quantized, step=0))
    write_labels(conn, labels)
    counts = [None] * tokenizer.n_ids if token_counts is None else [int(c) for c in token_counts]
    conn.executemany("INSERT INTO vocab (id, token, bytes, count) VALUES (?, ?, ?, ?)",
                     [(*row, counts[row[0]]) for row in tokenizer.vocab_rows()])
    conn.executemany("INSERT INTO tokenizer (key, value) VALUES (?, ?)",
                     [("kind", tokenizer.kind), *tokenizer.state().items()])
    for table, rows in weight_rows(model.params, formats=formats).items():  # checkpoints rewrite them
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


def _create_in_app(path, model, train_cfg, tokenizer, state, overwrite, token_counts, prefix,
                   labels, stored=()):
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
            with _durable(conn), atomic(conn):
                _replace_prefixed(conn, path, prefix, overwrite)
                for _, _, sql in schema_objects():
                    conn.execute(sql)  # under the prefixed names
                conn.execute(f"CREATE TABLE {prefix}{PREFIX_SCHEMA} (key TEXT PRIMARY KEY, "
                             f"value)")
                conn.executemany(f"INSERT INTO {prefix}{PREFIX_SCHEMA} (key, value) "
                                 f"VALUES (?, ?)",
                                 [("application", "sqlgpt"), ("version", SCHEMA_VERSION)])
                _new_model_rows(conn, model, tokenizer, token_counts, labels, stored)
                _checkpoint_rows(conn, model, train_cfg, state, None, None)
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


def _write_checkpoint(conn, model, train_cfg, state, train_loss, val_loss):
    with atomic(conn):
        _checkpoint_rows(conn, model, train_cfg, state, train_loss, val_loss)


def _checkpoint_rows(conn, model, train_cfg, state, train_loss, val_loss):
    """Everything a checkpoint writes (inside its transaction)."""
    rowids = {table: table_rowids(conn, table) for table in WEIGHT_TABLES}
    formats = read_formats(conn, model.arch)
    if formats and any(hasattr(t, "m") for t in model.params):
        raise SqlgptError("this model is kept in its import's precision: train a copy of it "
                          "(--init-from), not the file itself")
    rows = weight_rows(model.params, rowids, formats)
    lora = getattr(model, "lora", None)
    conn.executemany("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)",
                     to_rows(model.arch, train_cfg) + (lora.rows() if lora else []))
    for table in WEIGHT_TABLES:
        expected = len(_row_columns(model.params, formats)[table][0])
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
            with atomic(dest):
                for table in WEIGHT_TABLES:
                    rows = dest.execute(f"SELECT rowid, data FROM {table}").fetchall()
                    dest.executemany(f"UPDATE {table} SET m = x'', v = x'', crc = ? WHERE "
                                     f"rowid = ?", [(zlib.crc32(data), rowid)
                                                    for rowid, data in rows])
                dest.execute("DELETE FROM checkpoint_weights")
                dest.execute("INSERT OR REPLACE INTO train_state (key, value) VALUES "
                             "('compacted', 'true')")
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
                with atomic(conn):
                    _merged_rows(conn, arch, weights)
                conn.execute("VACUUM")
            finally:
                conn.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def _merged_rows(conn, arch, weights):
    """A compacted fine-tune's copy made a plain model (inside a transaction):
    the merged weights instead of the adapters, and their statistics."""
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
        with atomic(dest):
            for table in tables_at(SCHEMA_VERSION):
                columns = ", ".join(row[1] for row in dest.execute(
                    f"PRAGMA main.table_info({table})"))
                dest.execute(f'INSERT INTO main.{table} ({columns}) SELECT {columns} '
                             f'FROM source."{prefix}{table}"')
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
        if hasattr(t, "m"):
            t.m[...], t.v[...] = 0.0, 0.0
    _check_values(model.params)


def write_evaluation(conn, step, evaluation):
    """One evaluation's row, in its own small transaction."""
    with sqlite_errors("cannot write the evaluation"), atomic(conn):
        conn.execute("INSERT OR REPLACE INTO evaluations (step, loss, perplexity, accuracy, "
                     "tokens) VALUES (?, ?, ?, ?, ?)",
                     (step, evaluation.loss, evaluation.perplexity, evaluation.accuracy,
                      evaluation.tokens))


def write_metrics(conn, rows):
    """rows: (step, loss, lr, tokens_per_sec, grad_norm) tuples, in one small transaction."""
    if not rows:
        return
    with sqlite_errors("cannot write training metrics"):
        _write_metrics(conn, rows)


def _write_metrics(conn, rows):
    with atomic(conn):
        conn.executemany("INSERT OR REPLACE INTO metrics (step, loss, lr, tokens_per_sec, "
                         "grad_norm) VALUES (?, ?, ?, ?, ?)", rows)


def write_quantized(conn, bits, group, step, blocks):
    """Replace the quantized rows of this bits by blocks ({tensor name: (q
    (OC, row bytes) uint8, scales (OC, C/group) float32)}) made from the
    checkpoint at step, in one transaction."""
    with atomic(conn):
        conn.execute("DELETE FROM quantized WHERE bits = ?", (bits,))
        conn.executemany(QUANTIZED_INSERT_SQL, _quantized_rows(bits, group, blocks, step))


QUANTIZED_INSERT_SQL = ("INSERT INTO quantized (tensor, bits, group_size, step, i, q, scales, "
                        "crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _quantized_rows(bits, group, blocks, step):
    for name, (q, scales) in blocks.items():
        scales = np.ascontiguousarray(scales, dtype="<f4")
        for i in range(q.shape[0]):
            qb, sb = q[i].tobytes(), scales[i].tobytes()
            yield name, bits, group, step, i, qb, sb, zlib.crc32(sb, zlib.crc32(qb))


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

