"""The `sqlgpt` command: parses options, shows progress, calls the library.
Its commands, a module per group: training (train, finetune, merge),
generation (generate, eval, tokenize), chat, serve, files (info, check, compact,
quantize, export, import) and explore (sql, datasette-metadata,
extension-path, plot, attention); common holds what they share."""
import click

from . import chat, explore, files, generation, serve, training
from .common import OneLineErrors


@click.group(cls=OneLineErrors)
@click.version_option(package_name="sqlgpt")
def main():
    """Train and run small GPT language models on a CPU, stored in one SQLite file."""


for _module in (training, generation, chat, serve, files, explore):
    for _command in _module.COMMANDS:
        main.add_command(_command)
