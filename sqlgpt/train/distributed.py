"""Data-parallel training on MPI (mpi4py): the ranks of `mpirun -n N sqlgpt
train` share every global batch, sum their gradients with MPI all-reduce and
apply the same update; with ZeRO-1 each keeps only its shard of the
optimizer's moments (reduce-scatter, update the shard, all-gather).

Rank 0 alone reads the corpus into token ids and alone writes the database;
it hands the model, the training state and the token ids to the others
(one shared-memory copy of the ids per host). Every collective step is
taken by every rank in the same order, and a decision (stop on a signal,
an error on rank 0) is agreed before anyone acts on it, so no rank waits
on one that has left. A rank that dies takes the job down with it (mpirun
ends the others); the database is then as its last checkpoint left it.

Without mpirun (or with one process) World is the single process and
training is exactly what it is without this module.
"""
import hashlib
import os
import pickle
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import AlreadyTrained, SqlgptError

# the variables a launcher sets for the size of the job: Open MPI's, and
# the PMI ones of MPICH, Intel MPI and Slurm
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
CHUNK_BYTES = 1 << 28      # broadcasts in pieces well under MPI's 2**31-element count
POLL_S = 0.002             # how often a rank waiting on rank 0 looks for its answer
SIGNAL_CODES = {"": 0, "SIGINT": 1, "SIGTERM": 2}
SHARD_ALIGN = 16           # ZeRO shards start on 64-byte boundaries, as the arenas' tensors do


def shard_bounds(n, size):
    """Where each of size ranks' shards of a flat arena of n floats starts,
    and n: nearly equal parts, each a multiple of SHARD_ALIGN floats long
    (but the last)."""
    units = -(-n // SHARD_ALIGN)
    return [min(n, r * units // size * SHARD_ALIGN) for r in range(size)] + [n]


def launched_size():
    """The number of processes the launcher started (1 without one)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


class Agreed(Exception):
    """An error every rank raises at the same point, so each may simply
    exit: rank 0 reports it (`error`, the exception to raise)."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class World:
    """One process: every collective is the identity."""
    rank, size, zero = 0, 1, 0

    @property
    def is_root(self):
        return self.rank == 0

    def rows(self, n):
        """This rank's rows [start, stop) of a batch of n."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def shard(self, n):
        """This rank's part [start, stop) of a flat arena of n floats."""
        bounds = shard_bounds(n, self.size)
        return bounds[self.rank], bounds[self.rank + 1]

    def on_root(self, work):
        return work()

    def agree(self, values):
        """Sum of a small float64 vector over the ranks."""
        return values

    def sum_(self, array):
        """array (float32) summed over the ranks, in place."""

    def gather_shards(self, array):
        """Every rank's shard of array (see shard) into array on every rank."""

    def scatter_sum(self, array, out):
        """array summed over the ranks; this rank's shard of the sum into out."""
        out[...] = array[slice(*self.shard(len(array)))]

    def to_root(self, array, shard):
        """Every rank's shard (its part of array, see shard) into array on
        rank 0 (where shard is array's first part itself)."""

    def from_root(self, array, shard):
        """Rank 0's array, each rank's part into its shard (on rank 0 the
        first part of array itself)."""

    def bcast(self, obj):
        return obj

    def bcast_array(self, array):
        """Rank 0's array (float32, any size) into array on every rank."""

    def host_array(self, array, count, dtype):
        """Rank 0's array of count ids, as one copy per host."""
        return array

    def check_same(self, what):
        """what: {name: value} that must agree across the ranks."""

    def same_weights(self, array):
        return True


class MpiWorld(World):
    """The ranks of an MPI job (COMM_WORLD), zero: the ZeRO stage (0 or 1)."""

    def __init__(self, comm, zero=0):
        from mpi4py import MPI
        self.MPI, self.comm, self.zero = MPI, comm, zero
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.host = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = self.host.Get_size()
        self._windows = []  # the shared-memory windows in use, kept open

    def _wait(self, request):
        """Wait without spinning a core (the waiting ranks would take it
        from rank 0's work: a database write, an evaluation)."""
        while not request.Test():
            time.sleep(POLL_S)

    def bcast(self, obj):
        """Rank 0's obj (pickled) on every rank."""
        data = pickle.dumps(obj) if self.is_root else b""
        size = np.array([len(data)], np.int64)
        self._wait(self.comm.Ibcast(size, root=0))
        buffer = np.frombuffer(data, np.uint8).copy() if self.is_root else np.empty(size[0],
                                                                                    np.uint8)
        self._wait(self.comm.Ibcast(buffer, root=0))
        return obj if self.is_root else pickle.loads(buffer.tobytes())

    def on_root(self, work):
        """work() on rank 0: its result there (None elsewhere); if it raised,
        Agreed on every rank, with rank 0's error (elsewhere a SqlgptError,
        or an AlreadyTrained, of the same message)."""
        error, result = None, None
        if self.is_root:
            try:
                result = work()
            except Agreed as e:
                error = e.error
            except Exception as e:  # noqa: BLE001 - every rank must hear of any failure
                error = e
        kind = self.bcast(None if error is None else
                          ("done" if isinstance(error, AlreadyTrained) else "error", str(error)))
        if kind is None:
            return result
        if not self.is_root:
            error = AlreadyTrained(0, None) if kind[0] == "done" else SqlgptError(kind[1])
        raise Agreed(error)

    def agree(self, values):
        out = np.empty_like(values)
        self.comm.Allreduce(values, out, op=self.MPI.SUM)
        return out

    def sum_(self, array):
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)

    def _counts(self, n):
        bounds = shard_bounds(n, self.size)
        return np.diff(bounds), np.array(bounds[:-1])

    def gather_shards(self, array):
        counts, starts = self._counts(len(array))
        self.comm.Allgatherv(self.MPI.IN_PLACE, [array, counts, starts, self.MPI.FLOAT])

    def scatter_sum(self, array, out):
        counts, _ = self._counts(len(array))
        self.comm.Reduce_scatter(array, out, counts, op=self.MPI.SUM)

    def to_root(self, array, shard):
        if self.is_root:
            counts, starts = self._counts(len(array))
            self.comm.Gatherv(self.MPI.IN_PLACE, [array, counts, starts, self.MPI.FLOAT])
        else:
            self.comm.Gatherv(shard, None)

    def from_root(self, array, shard):
        if self.is_root:
            counts, starts = self._counts(len(array))
            self.comm.Scatterv([array, counts, starts, self.MPI.FLOAT], self.MPI.IN_PLACE)
        else:
            self.comm.Scatterv(None, shard)

    def bcast_array(self, array):
        flat = array.reshape(-1).view(np.uint8)
        for start in range(0, len(flat), CHUNK_BYTES):
            self.comm.Bcast(flat[start:start + CHUNK_BYTES], root=0)

    def host_array(self, array, count, dtype):
        """The ids in one shared-memory window per host, filled by the
        host's first rank (from rank 0, over the network, elsewhere)."""
        MPI, dtype = self.MPI, np.dtype(dtype)
        leader = self.host.Get_rank() == 0
        window = MPI.Win.Allocate_shared(count * dtype.itemsize if leader else 0,
                                         dtype.itemsize, comm=self.host)
        self._windows.append(window)
        buffer, _ = window.Shared_query(0)
        shared = np.ndarray(buffer=buffer, dtype=dtype, shape=(count,))
        leaders = self.comm.Split(0 if leader else MPI.UNDEFINED, key=self.rank)
        if leader:
            if self.is_root:
                shared[...] = array
            for start in range(0, count, CHUNK_BYTES // dtype.itemsize):
                leaders.Bcast(shared[start:start + CHUNK_BYTES // dtype.itemsize], root=0)
            leaders.Free()
        window.Fence()
        self.host.Barrier()
        return shared

    def check_same(self, what):
        """what ({name: digest, or an Exception met computing it}) against
        rank 0's: one message naming the first rank and item that differ,
        raised on every rank."""
        everyone = self.comm.allgather({name: f"error: {value}" if isinstance(value, Exception)
                                        else value for name, value in what.items()})
        for rank, theirs in enumerate(everyone):
            for name, value in theirs.items():
                if value.startswith("error: "):
                    raise Agreed(SqlgptError(f"rank {rank} cannot read its {name}: "
                                             f"{value.removeprefix('error: ')}"))
                if value != everyone[0][name]:
                    raise Agreed(SqlgptError(
                        f"rank {rank} has another {name} than rank 0 (SHA-256 {value[:12]} "
                        f"against {everyone[0][name][:12]}): every rank must run the same sqlgpt "
                        f"with the same options on the same corpus"))

    def same_weights(self, array):
        """True when array is bit for bit the same on every rank."""
        digest = hashlib.sha256(array.view(np.uint8)).hexdigest()
        return len(set(self.comm.allgather(digest))) == 1

    def abort(self, message):
        """Stop the whole job now (an error on this rank alone: the others
        may be waiting on it); the database keeps its last checkpoint."""
        sys.stderr.write(f"Error: rank {self.rank}: {message}\n")
        sys.stderr.flush()
        self.comm.Abort(1)


def world(zero=0):
    """The World of this process: MPI's when a launcher started more than
    one, else the single process."""
    if zero not in (0, 1):
        raise SqlgptError(f"--zero is 0 (every rank keeps all optimizer state) or 1 (each keeps "
                          f"its shard), not {zero}")
    size = launched_size()
    if size <= 1:
        if zero:
            raise SqlgptError("--zero 1 shards the optimizer state over MPI ranks: run under "
                              "mpirun with more than one process")
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise SqlgptError(f"the launcher started {size} processes but mpi4py is not installed, "
                          f"so they cannot train together: pip install 'sqlgpt[mpi]' (or run "
                          f"without mpirun)") from None
    if MPI.COMM_WORLD.Get_size() != size:  # mpi4py on another MPI than the launcher's
        raise SqlgptError(f"the launcher started {size} processes but MPI joins "
                          f"{MPI.COMM_WORLD.Get_size()} of them: mpi4py is built for another "
                          f"MPI than the one running mpirun")
    return MpiWorld(MPI.COMM_WORLD, zero)


def batch_too_small(batch_size, ranks):
    return (f"--batch-size {batch_size} is fewer sequences than the {ranks} ranks: each rank "
            f"needs at least one of every batch")


@contextmanager
def collective(world):
    """Errors in an MPI job: one every rank agreed on is raised on rank 0
    (and AlreadyTrained everywhere) and is a quiet exit 1 elsewhere; any
    other is this rank's alone, and ends the whole job (world.abort)."""
    if world.size == 1:
        yield
        return
    try:
        yield
    except Agreed as e:
        if world.is_root or isinstance(e.error, AlreadyTrained):
            raise e.error from None
        raise SystemExit(1) from None
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the others would wait for this rank forever
        world.abort(str(e) or type(e).__name__)


def code_digest():
    """SHA-256 of the installed package: its Python modules and C kernel."""
    package = Path(__file__).parents[1]  # the sqlgpt package folder
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".so", ".pyd", ".sql") and "__pycache__" not in path.parts:
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
