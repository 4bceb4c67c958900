"""How many CPUs this process may really use: the ones its affinity allows,
and no more than its cgroup's CPU quota (a container given 1.5 CPUs of a
64-core host must not start 64 threads that the quota then stalls at every
barrier). The kernel's default thread count is this."""
import math
import os
from pathlib import Path


def usable_cpus(cgroup=Path("/sys/fs/cgroup")):
    """min(CPUs in the affinity mask, the cgroup quota rounded up), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    quota = _quota(Path(cgroup))
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def _quota(cgroup):
    """The CPU quota in CPUs (cgroup v2's cpu.max, or v1's cfs files), or None."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.is_file():
            limit, period = v2.read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        v1 = cgroup / "cpu"
        limit = int((v1 / "cpu.cfs_quota_us").read_text())
        period = int((v1 / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 or period <= 0 else limit / period
    except (OSError, ValueError, ZeroDivisionError):
        return None
