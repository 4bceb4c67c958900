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

if "OMP_NUM_THREADS" not in _environ:  # else the user chose
    from ._kernel import lib as _lib
    if _usable_cpus() < _lib.max_threads():
        _lib.set_threads(_usable_cpus())
from .api import Model, load, merge, quantize
from .errors import SqlgptError
from .sql.functions import connect, extension_path, register


def set_threads(n):
    """Threads for every kernel call from now on (default: every CPU the
    process may use: its affinity, within its cgroup's CPU quota)."""
    from ._kernel import lib
    if not isinstance(n, int) or not 1 <= n <= 4096:
        raise SqlgptError(f"threads must be an integer from 1 to 4096, got {n!r}")
    lib.set_threads(n)

__version__ = "0.1.0"
__all__ = ["load", "merge", "quantize", "Model", "SqlgptError", "connect", "register",
           "extension_path", "set_threads", "__version__"]
