"""Runs `sqlgpt train ...` with a marker file that exists exactly while a
checkpoint transaction is open, so a test can SIGKILL the trainer mid-save.

usage: python crash_driver.py MARKER sqlgpt-train-arguments...
"""
import sys
from pathlib import Path

from sqlgpt.store import database as store
from sqlgpt.cli import main

marker = Path(sys.argv.pop(1))
write_checkpoint = store._write_checkpoint


def marked_write_checkpoint(*args, **kwargs):
    marker.touch()
    try:
        return write_checkpoint(*args, **kwargs)
    finally:
        marker.unlink(missing_ok=True)


store._write_checkpoint = marked_write_checkpoint
main(prog_name="sqlgpt")
