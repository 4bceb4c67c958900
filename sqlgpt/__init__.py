"""sqlgpt: train and run small GPT-style language models on a CPU, stored in SQLite."""
from .api import Model, load
from .errors import SqlgptError

__version__ = "0.1.0"
__all__ = ["load", "Model", "SqlgptError", "__version__"]
