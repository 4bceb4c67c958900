"""sqlgpt: train and run small GPT-style language models on a CPU, stored in SQLite."""
import importlib as _importlib
from os import environ as _environ

try:
    _importlib.import_module(f"{__name__}._kernel")  # built by pip install
except ImportError:
    import os as _os
    raise ImportError(f"sqlgpt's C kernel is not built in {_os.path.dirname(__file__)}: this is "
                      f"the source folder, not the installed package; run Python from another "
                      f"folder, or build the kernel in place with pip install -e .") from None
from .model.cpus import usable_cpus as _usable_cpus

from ._kernel import lib as _lib
if _environ.get("OMP_NUM_THREADS"):  # the user chose: a fixed count
    _lib.set_threads(_lib.max_threads())
else:  # the governor chooses, up to the CPUs this process may use
    _lib.set_thread_ceiling(min(_usable_cpus(), _lib.max_threads()))
from .api import Model, load, merge, quantize
from .errors import SqlgptError
from .sql.functions import connect, extension_path, register


def set_threads(n):
    """Threads for every kernel call from now on: a fixed count, or "auto"
    (the default): up to every CPU the process may use (its affinity, within
    its cgroup's CPU quota), fewer while measured steps run faster on fewer,
    as they do when other processes share the cores."""
    from ._kernel import lib
    if n == "auto":
        lib.set_thread_ceiling(_usable_cpus())
        return
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
        raise SqlgptError(f"threads must be \"auto\" or an integer from 1 to 4096, got {n!r}")
    lib.set_threads(n)

__version__ = "0.1.0"
__all__ = ["load", "merge", "quantize", "Model", "SqlgptError", "connect", "register",
           "extension_path", "set_threads", "__version__"]
