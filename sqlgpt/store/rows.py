"""Where each parameter's rows live and how a row is coded (float32 BLOBs
with a CRC), and reading everything back, validated: config, tokenizer,
weights, training state."""
import json
import math
import sqlite3
import weakref
import zlib

import numpy as np

from .._kernel import ffi, lib
from ..contract import MODEL_TENSOR_TABLES, TENSOR_FORMATS
from ..contract import WEIGHT_TABLES as KEY_COLUMNS
from ..model.arch import stored_tensors
from ..model.quant import Quantized, dequantize, dequantize_rows
from ..model.quant import matrices as quant_matrices
from ..model.config import from_rows
from ..errors import SqlgptError
from ..model.tensor import fptr
from ..data.tokenizers import from_storage
from .connection import ADDED_IN, WEIGHT_TABLES, schema_version, sqlite_errors, tables_at


# ---- where each parameter's rows live (contract.WEIGHT_TABLES) ----


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

# one parameter's rows alone (a decoder reads the tensors one at a time)
TENSOR_ROWS_SQL = {table: f"SELECT {keys[-1]}, data, m, v, crc FROM {table}"
                          + (f" WHERE {' AND '.join(f'{k} = ?' for k in keys[:-1])}"
                             if len(keys) > 1 else "") + f" ORDER BY {keys[-1]}"
                   for table, keys in KEY_COLUMNS.items()}


# ---- how a tensor is stored (contract.TENSOR_FORMATS; float32 where none is named) ----
HALVES = {"f16": "<f2", "bf16": "<u2"}  # rows of 2-byte values in the weight tables
INTEGERS = {"int8": 8, "int4": 4}  # no rows: the quantized copy of those bits
VALUE_BYTES = {"f32": 4, **TENSOR_FORMATS}


def _values(raw, fmt):
    """The float32 values of rows' bytes stored in fmt (f32, f16, bf16)."""
    if fmt == "f16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    if fmt == "bf16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, "<f4")


def _encoded(values, fmt):
    """values (float32) as fmt stores them (exactly: formats_of chose fmt)."""
    if fmt == "f16":
        return np.ascontiguousarray(values, dtype="<f2")
    if fmt == "bf16":
        return (np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")
    return _stored(values)


def _same_bits(a, b):
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint32),
                                                 np.ascontiguousarray(b).view(np.uint32))


def formats_of(arch, weights, quantized=None):
    """{name: format} for an import's tensors ({name: float32 array}), each
    in the narrowest form that holds its values bit for bit: its quantized
    copy (quantized: (bits, group, {matrix: (q, scales)}), a Q8_0 / Q4_0
    file's blocks), IEEE half, bfloat16; float32 (no entry) otherwise."""
    bits, group, blocks = quantized or (0, 0, {})
    sources = {spec.tied_to or spec.name: spec for spec in quant_matrices(arch)}
    out = {}
    for spec in stored_tensors(arch):
        values = weights[spec.name]
        source = sources.get(spec.name)
        if source is not None and source.name in blocks:
            held = dequantize(*blocks[source.name], source.shape[0], bits, group)
            if _same_bits(held.T if source.tied_to else held, values):
                out[spec.name] = f"int{bits}"
                continue
        with np.errstate(over="ignore"):
            for fmt in HALVES:
                if _same_bits(_values(_encoded(values, fmt).tobytes(), fmt).reshape(values.shape),
                              values):
                    out[spec.name] = fmt
                    break
    return out


def read_formats(conn, arch):
    """{tensor name: format} of the tensors not stored as float32 rows (none
    before version 6), checked against arch: a stored tensor, a format of
    contract.TENSOR_FORMATS, and an integer one only for a matrix the
    quantized copy holds (or a tied wte, held by the head's rows)."""
    if schema_version(conn) < ADDED_IN["tensor_formats"]:
        return {}
    try:
        rows = conn.execute("SELECT name, format FROM tensor_formats").fetchall()
    except sqlite3.DatabaseError as e:
        raise SqlgptError(f"the tensor_formats table is damaged: {e}") from None
    stored = {spec.name for spec in stored_tensors(arch)}
    held = {spec.tied_to or spec.name for spec in quant_matrices(arch)}
    for name, fmt in rows:
        if name not in stored or fmt not in TENSOR_FORMATS or (fmt in INTEGERS and
                                                               name not in held):
            raise SqlgptError(f"the tensor_formats table is damaged: {name!r} stored as "
                              f"{fmt!r}")
    return dict(rows)


def stored_parameters(conn, arch):
    """{format: parameters stored in it} (f32 for float32 rows), largest first."""
    formats, counts = read_formats(conn, arch), {}
    for spec in stored_tensors(arch):
        fmt = formats.get(spec.name, "f32")
        counts[fmt] = counts.get(fmt, 0) + spec.rows * spec.cols
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def integer_sets(conn, formats):
    """quantized_sets where formats name an integer tensor (else {}): read
    once per snapshot, not once per tensor (each is a scan of the table)."""
    return quantized_sets(conn) if any(f in INTEGERS for f in formats.values()) else {}


def _dequantized(conn, arch, name, fmt, sets):
    """The float32 values of tensor name, stored as its int8 / int4 copy
    (sets: integer_sets of the snapshot)."""
    bits = INTEGERS[fmt]
    found = sets.get(bits)
    source = next(s for s in quant_matrices(arch) if (s.tied_to or s.name) == name)
    if found is None or found[0] not in (32, 64) or source.shape[0] % found[0]:
        raise SqlgptError(f"{name} is stored as its {fmt} copy, which the file lacks or "
                          f"holds damaged")
    group = found[0]
    q, scales = _quantized_matrix(conn, source.name, *source.shape, bits, group)
    rows = dequantize_rows(q, scales, source.shape[0], bits, group)  # (OC, C): a tied wte
    return rows if source.tied_to else np.ascontiguousarray(rows.T)


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


def _row_columns(params, formats=None):
    """{table: [data, m, v, *key columns]}: per-table column lists, rows in
    the tables' key order (the order of SELECT ... ORDER BY the key); with
    formats (an import's, formats_of), each tensor's rows in its format and
    none for one its quantized copy holds."""
    columns = None if formats else _ROW_COLUMNS.get(params)
    if columns is not None:
        return columns
    formats = formats or {}
    columns = {table: [[] for _ in range(3 + len(keys))] for table, keys in KEY_COLUMNS.items()}
    in_place = True
    for t in _in_key_order(params):
        table, key = location(t.spec)
        n = t.spec.rows
        fmt = formats.get(t.name, "f32")
        if fmt in INTEGERS:
            continue
        if not hasattr(t, "m"):  # weights alone (an import): the compacted layout
            stored = _encoded(t.data, fmt)
            in_place &= stored is t.data
            values = [list(map(memoryview, stored.reshape(n, -1))), [b""] * n,
                      [b""] * n] + [[k] * n for k in key] + [range(n)]
            for column, part in zip(columns[table], values):
                column.extend(part)
            continue
        stored = [_stored(buf) for buf in (t.data, t.m, t.v)]
        in_place &= all(s is buf for s, buf in zip(stored, (t.data, t.m, t.v)))
        values = [list(map(memoryview, s.reshape(n, t.spec.cols))) for s in stored] + \
            [[k] * n for k in key] + [range(n)]
        for column, part in zip(columns[table], values):
            column.extend(part)
    if in_place and not formats:  # a big-endian host stores copies: made afresh each time
        _ROW_COLUMNS[params] = columns
    return columns


def weight_rows(params, rowids=None, formats=None):
    """{table: [(data, m, v, crc, *key, i)]}: every matrix row of every
    parameter, in key order; with rowids ({table: [rowid]} in key order),
    (data, m, v, crc, rowid, *key, i), as UPDATE_SQL takes them; with
    formats, as _row_columns stores them."""
    formats = formats or {}
    crcs = {table: [] for table in WEIGHT_TABLES}
    for t in _in_key_order(params):
        fmt = formats.get(t.name, "f32")
        if fmt in INTEGERS:
            continue
        crcs[location(t.spec)[0]].extend(
            row_crcs(t) if hasattr(t, "m") else  # compacted: each crc over data alone
            [zlib.crc32(row) for row in _encoded(t.data, fmt).reshape(t.spec.rows, -1)])
    rows = {}
    for table, (data, m, v, *keys) in _row_columns(params, formats).items():
        extra = [rowids[table]] if rowids else []
        rows[table] = list(zip(data, m, v, crcs[table], *extra, *keys))
    return rows


def table_rowids(conn, table):
    """The rowids of a weight table in key order."""
    return [r[0] for r in conn.execute(f"SELECT rowid FROM {table} "
                                       f"ORDER BY {', '.join(KEY_COLUMNS[table])}")]


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


# ---- reading, validating everything ----
def read_config(conn):
    """(ArchConfig, TrainConfig) from the config table, validated (a version-1
    table has no architecture keys: from_rows reads it as the lua preset)."""
    try:
        return from_rows(dict(conn.execute("SELECT key, value FROM config")))
    except (sqlite3.DatabaseError, TypeError) as e:
        raise SqlgptError(f"the config table is damaged: {e}") from None


def check_fits(conn, arch):
    """Validate before allocating: the weights arch claims (float32 data
    alone, as a compacted file holds them) must fit in the database file
    that is said to hold them, so a damaged or hostile config cannot make
    the loader take gigabytes before a single row is read."""
    formats = read_formats(conn, arch)
    claimed = sum(VALUE_BYTES[formats.get(spec.name, "f32")] * spec.rows * spec.cols
                  for spec in stored_tensors(arch))
    pages, page_size = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                        for name in ("page_count", "page_size"))
    if claimed > pages * page_size:
        raise SqlgptError(f"the config claims {claimed / 1e6:,.0f} MB of weights, more than "
                          f"the {pages * page_size / 1e6:,.1f} MB file holds: the file is damaged")


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
    params = {location(t.spec): t for t in model.params}
    formats = read_formats(conn, model.arch)
    filled, unknown = set(), []
    try:
        for table in weight_tables(conn):
            groups = conn.execute(GROUPS_SQL[table]).fetchall()
            rows = conn.execute(ROWS_SQL[table])  # streamed: one parameter's rows at a time
            for *key, count, distinct, first, last, non_integers in groups:
                if not count:  # an empty head table still gives its one aggregate row
                    continue
                loc = (table, tuple(key))
                chunk = rows.fetchmany(count)
                if loc not in params:
                    unknown.append(describe(*loc))
                    continue
                index_range = (first, last) if distinct == count and not non_integers else None
                fmt = formats.get(params[loc].name, "f32")
                if fmt in INTEGERS:
                    raise SqlgptError(f"weights of {params[loc].name} are damaged: rows in "
                                      f"{table} for a tensor stored as its {fmt} copy")
                _fill(params[loc], chunk, index_range, fmt)
                filled.add(loc)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read weights: {e}") from None
    if unknown:
        raise SqlgptError(f"weights for unknown parameter(s): {', '.join(sorted(unknown))}")
    sets = integer_sets(conn, formats)
    for loc, t in params.items():
        if loc in filled:
            continue
        if formats.get(t.name) in INTEGERS:
            t.data[...] = _dequantized(conn, model.arch, t.name, formats[t.name], sets)
        else:
            _fill(t, [], None)
    _check_values(model.params)


def read_tensor(conn, arch, spec, formats, sets, halves=False):
    """One stored parameter's float32 weights, checked as read_weights
    checks them (its rows, their lengths and checksums, finite values, sane
    moments), each row read straight into place: a reader of one tensor at
    a time holds it once (formats: read_formats; sets: integer_sets). With
    halves, a tensor stored in f16 comes as its float16 values, with no
    float32 copy. Call inside a transaction."""
    fmt = formats.get(spec.name, "f32")
    if fmt in INTEGERS:
        return _dequantized(conn, arch, spec.name, fmt, sets)
    halves = halves and fmt == "f16"
    table, key = location(spec)
    data = np.empty((spec.rows, spec.cols), dtype=np.float16 if halves else np.float32)
    count, width = 0, VALUE_BYTES[fmt] * spec.cols
    try:
        for i, row, m, v, crc in conn.execute(TENSOR_ROWS_SQL[table], key):
            if i != count or count >= spec.rows:
                break
            full = m != b"" or v != b""  # a training file's row: data || m || v (float32)
            if full and fmt != "f32":
                break
            if any(type(b) is not bytes or len(b) != width for b in ((row, m, v) if full
                                                                    else (row,))):
                raise SqlgptError(f"weights of {spec.name} are damaged: a row is not "
                                  f"{spec.cols} {'float32' if fmt == 'f32' else fmt} values")
            if (row_crc(row, m, v) if full else zlib.crc32(row)) != crc:
                raise SqlgptError(f"weights of {spec.name} are damaged: row {i} fails its "
                                  f"checksum")
            if full:
                _check_moments(spec.name, np.frombuffer(m, "<f4"), np.frombuffer(v, "<f4"))
            data[i] = np.frombuffer(row, "<f2") if halves else _values(row, fmt)
            count += 1
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read weights: {e}") from None
    if count != spec.rows:
        raise SqlgptError(f"weights of {spec.name} are damaged: expected rows "
                          f"0..{spec.rows - 1}, found others")
    if not _finite(data.reshape(-1)):
        raise SqlgptError(f"weights of {spec.name} contain NaN or Inf")
    return data.reshape(spec.shape)


def _finite(flat):
    """Whether every value is finite: one dot product for float32 (finite
    unless a value is not, or the sum overflows: then each is looked at);
    halves a million at a time (their dot product overflows at 256)."""
    if flat.dtype == np.float16:
        step = 1 << 20
        return all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.size, step))
    with np.errstate(over="ignore"):
        return math.isfinite(np.dot(flat, flat)) or np.isfinite(flat).all()


def _check_values(params):
    """Every weight and moment finite, every second moment >= 0. The fast
    test is one dot product per arena (finite whenever every value is, short
    of float32 overflow); only when it fails are the parameters searched."""
    arenas = params.arenas
    kept = [b for b in ("data", "m", "v") if b in arenas]
    with np.errstate(over="ignore"):
        quick = all(math.isfinite(np.dot(arenas[b], arenas[b])) for b in kept)
    if quick and ("v" not in arenas or arenas["v"].min() >= 0):
        return
    for t in params:
        if not all(np.isfinite(getattr(t, b)).all() for b in kept):
            raise SqlgptError(f"weights of {t.name} contain NaN or Inf")
        if "v" in arenas and (t.v < 0).any():
            raise SqlgptError(f"weights of {t.name} are damaged: negative Adam second moment")


def _fill(t, rows, index_range, fmt="f32"):
    """Copy one parameter's rows (data, m, v, crc), whose distinct integer
    indices span index_range (first, last; None if they are not such), into
    its buffers; a half format's rows (fmt) are compacted ones. This is the hot path of every load: the whole copy and its
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
    moments = hasattr(t, "m")  # a model to run holds its weights alone
    width = VALUE_BYTES[fmt] * ncols
    if columns and len(columns[0]) == width * nrows and columns[1] == columns[2] == b"":
        # a compacted file (sqlgpt compact, an import): no moments, each crc over data alone
        t.data[...] = _values(columns[0], fmt).reshape(t.shape)
        if moments:
            t.m[...], t.v[...] = 0.0, 0.0
        bad = [i for i, (row, c) in enumerate(zip(data, crc)) if zlib.crc32(row) != c]
        if not bad:
            return
        raise SqlgptError(f"weights of {t.name} are damaged: row {bad[0]} fails its checksum")
    if fmt != "f32":
        raise SqlgptError(f"weights of {t.name} are damaged: a row is not {ncols} {fmt} values")
    # the moments are read to check each row's crc, then dropped if t keeps none
    held = t if moments else _Row(t.spec, t.data, np.empty(t.shape, np.float32),
                                  np.empty(t.shape, np.float32))
    if columns and all(len(c) == 4 * t.data.size for c in columns):
        for column, buf in zip(columns, (held.data, held.m, held.v)):
            buf[...] = np.frombuffer(column, dtype="<f4").reshape(t.shape)
        if row_crcs(held) == list(crc):  # over the copied rows: the same bytes, in one call
            if not moments:
                _check_moments(t.name, held.m, held.v)
            return
    for column in (data, m, v):
        if set(map(type, column)) != {bytes} or set(map(len, column)) != {4 * ncols}:
            raise SqlgptError(f"weights of {t.name} are damaged: a row is not {ncols} "
                              f"float32 values")
    bad = next(i for i, (a, b) in enumerate(zip(row_crcs(held), crc)) if a != b)
    raise SqlgptError(f"weights of {t.name} are damaged: row {bad} fails its checksum")


class _Row:
    """A parameter's rows with moments read only to check them."""

    def __init__(self, spec, data, m, v):
        self.spec, self.data, self.m, self.v = spec, data, m, v


def _check_moments(name, m, v):
    if not (np.isfinite(m).all() and np.isfinite(v).all()):
        raise SqlgptError(f"weights of {name} contain NaN or Inf")
    if (v < 0).any():
        raise SqlgptError(f"weights of {name} are damaged: negative Adam second moment")


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
    """{name: Quantized (q, scales)} of the int`bits` copy, for shapes ({name:
    (C, OC)}, every quantized matrix), each row checked: its length, its
    checksum, finite scales, and no rows missing or extra. Each matrix's
    rows are read straight into the one buffer the kernel reads (q and
    scales are views of its .block): the copy is in memory once."""
    group, _ = quantized_sets(conn)[bits]
    if group not in (32, 64) or any(C % group for C, _ in shapes.values()):
        raise SqlgptError(f"the int{bits} weights are damaged: group size {group!r} does not "
                          f"fit the model's matrices")
    with sqlite_errors("cannot read the quantized table"):
        names = {name for (name,) in conn.execute(
            "SELECT DISTINCT tensor FROM quantized WHERE bits = ?", (bits,))}
        unknown = sorted(names - set(shapes))
        if unknown:
            raise SqlgptError(f"int{bits} weights for unknown tensor(s): {', '.join(unknown)}")
        return group, {name: _quantized_matrix(conn, name, C, OC, bits, group)
                       for name, (C, OC) in shapes.items()}


def _quantized_matrix(conn, name, C, OC, bits, group):
    matrix = Quantized.empty(C, OC, bits, group)
    q, scales = matrix
    count = 0
    for i, qb, sb, crc in conn.execute("SELECT i, q, scales, crc FROM quantized WHERE bits = ? "
                                       "AND tensor = ? ORDER BY i", (bits, name)):
        if i != count or count >= OC:
            break
        if not (isinstance(qb, bytes) and isinstance(sb, bytes)
                and len(qb) == q.shape[1] and len(sb) == 4 * scales.shape[1]):
            raise SqlgptError(f"the int{bits} weights of {name} are damaged: row {i} has "
                              f"the wrong length")
        if zlib.crc32(sb, zlib.crc32(qb)) != crc:
            raise SqlgptError(f"the int{bits} weights of {name} are damaged: row {i} fails "
                              f"its checksum")
        q[i] = np.frombuffer(qb, dtype=np.uint8)
        scales[i] = np.frombuffer(sb, dtype="<f4")
        count += 1
    if count != OC:
        raise SqlgptError(f"the int{bits} weights of {name} are damaged: expected rows "
                          f"0..{OC - 1}, found others")
    if not np.isfinite(scales).all():
        raise SqlgptError(f"the int{bits} weights of {name} have NaN or Inf scales")
    return matrix


def read_train_state(conn):
    try:
        return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM train_state")}
    except (sqlite3.DatabaseError, TypeError, ValueError, RecursionError) as e:
        raise SqlgptError(f"the train_state table is damaged: {type(e).__name__}") from None

