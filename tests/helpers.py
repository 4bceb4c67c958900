"""Shared test helpers."""
import numpy as np


def rel_err(ours, ref):
    """||ours - ref|| / ||ref||, in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(ours - ref) / (denom if denom > 0 else 1.0)
