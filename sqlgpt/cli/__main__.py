"""python -m sqlgpt.cli: the sqlgpt command."""
from . import main

main()
