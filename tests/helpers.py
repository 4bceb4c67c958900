"""Shared test helpers."""
import numpy as np


def rel_err(ours, ref):
    """||ours - ref|| / ||ref||, in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(ours - ref) / (denom if denom > 0 else 1.0)


def weights_bytes(db):
    """Every weight row of a database (keys, data, m, v, crc), for exact comparisons."""
    from sqlgpt import store
    conn = store.open_database(db)
    rows = [row for table in store.WEIGHT_TABLES for row in conn.execute(store.SELECT_SQL[table])]
    conn.close()
    return rows
