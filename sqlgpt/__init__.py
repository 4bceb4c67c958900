"""sqlgpt: train and run small GPT-style language models on a CPU, stored in SQLite."""
from .api import Model, load
from .errors import SqlgptError


def set_threads(n):
    """Threads for every kernel call from now on (default: every core)."""
    from ._kernel import lib
    if not isinstance(n, int) or not 1 <= n <= 4096:
        raise SqlgptError(f"threads must be an integer from 1 to 4096, got {n!r}")
    lib.set_threads(n)

__version__ = "0.1.0"
__all__ = ["load", "Model", "SqlgptError", "set_threads", "__version__"]
