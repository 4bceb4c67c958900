"""What every command shares: one-line errors, JSON output, the --db /
--prefix, --precision, --step, --threads and -o options, how a token and a
loss are shown."""
import functools
import json
import math
import sys

import click

from .. import set_threads, store
from ..errors import SqlgptError
from ..inference.decoder import PRECISIONS


def fail_cleanly(fn):
    """Turn library errors into one-line messages with a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SqlgptError as e:
            raise click.ClickException(str(e)) from None
        except MemoryError:
            raise click.ClickException("out of memory: try a smaller --batch-size, "
                                       "--seq-len or --embed-dim") from None
    return wrapper


def emit_json(obj):
    """One line of strict JSON: NaN/Inf (a diverged loss) become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    click.echo(json.dumps(clean(obj), allow_nan=False, default=str))


class OneLineErrors(click.Group):
    """Usage mistakes (a bad option value, a missing argument) are one line
    on stderr and exit 2, like every other error, instead of click's usage block."""

    def main(self, args=None, **kwargs):
        try:
            code = super().main(args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def apply_threads(ctx, param, value):
    if value is not None:
        set_threads(value)
    return value


def checked_prefix(ctx, param, value):
    try:
        return store.check_prefix(value)
    except SqlgptError as e:
        raise click.BadParameter(str(e).removeprefix("bad --prefix ")) from None


def db_option(fn):
    """--db and --prefix: where the model is."""
    fn = click.option("--prefix", default="", callback=checked_prefix, metavar="PREFIX",
                      help="The model's table prefix inside an app's own database (e.g. gpt_): "
                           "its tables sit beside the app's, which are left untouched.")(fn)
    return click.option("--db", "db_path", required=True, type=click.Path(),
                        help="SQLite file that holds the model.")(fn)


def precision_option(fn):
    """--precision: the weights' format while decoding."""
    return click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
                        show_default=True,
                        help="Weights while decoding: bf16 and f16 stream half the bytes of "
                             "fp32 per token (f16 keeps an F16 or BF16 import's values "
                             "exactly), int8 and int4 a quarter and an eighth (from sqlgpt "
                             "quantize's or a Q8_0/Q4_0 file's copies; integer dot "
                             "products).")(fn)


def output_option(help_text):
    return click.option("-o", "--output", "out_path", required=True, type=click.Path(),
                        help=help_text)


step_option = click.option(
    "--step", type=click.IntRange(min=0), default=None,
    help="Use the checkpoint of this step (one train --keep kept). [default: the latest]")

class ThreadCount(click.ParamType):
    """An integer from 1 to 4096, or auto."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return click.IntRange(1, 4096).convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not auto or an integer from 1 to 4096", param, ctx)


threads_option = click.option(
    "--threads", type=ThreadCount(), default=None, expose_value=False,
    callback=apply_threads,
    help="Threads for the kernel: a fixed count, or auto: every core the process may use, "
         "fewer while steps measure faster on fewer (a busy machine). [default: auto]")



def shown_piece(piece):
    """A token's piece on one line: line breaks and tabs as escapes (a piece
    that is not UTF-8 already reads \\xNN)."""
    return piece.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def fmt_loss(value):
    return "-" if value is None else f"{value:.4f}"



# how generate and chat draw tokens: one set of options, one set of defaults
SAMPLING_OPTIONS = (
    click.option("--max-tokens", type=click.IntRange(min=0), default=50, show_default=True,
                 help="Tokens to generate."),
    click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
                 help="Sampling temperature (0 = greedy)."),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Sample among the k most likely tokens (0 = all)."),
    click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
                 show_default=True, help="Nucleus sampling: smallest set with this probability."),
    click.option("--min-p", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
                 help="Keep tokens at least this fraction as likely as the most likely one."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                 show_default=True,
                 help="Above 1, tokens already in the context become less likely."),
    click.option("--stop", multiple=True,
                 help="End the text before this string (repeatable); <eos> and --max-tokens "
                      "end it too."),
    click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
                 help="Seed for reproducible samples (sample i of a batch uses seed + i)."),
)


def sampling_options(fn):
    """--max-tokens, --temperature, --top-k, --top-p, --min-p,
    --repetition-penalty, --stop and --seed."""
    for option in reversed(SAMPLING_OPTIONS):
        fn = option(fn)
    return fn


def typed_lines(prompt="> "):
    """Yield the lines typed at prompt (with line editing and history where
    readline is there), skipping blank ones; Ctrl-C clears the line, Ctrl-D
    or the end of input ends them."""
    import importlib
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            line = input(prompt)
        except KeyboardInterrupt:
            click.echo()
            continue
        except EOFError:
            click.echo()
            return
        if line.strip():
            yield line


FROM_SQL = "<--sql>"  # --chat given no file: its conversations are --sql's rows


def sql_options(fn):
    """--sql QUERY and --from DB: a corpus of a query's rows."""
    fn = click.option("--from", "from_db", type=click.Path(), default=None,
                      help="The SQLite database --sql reads (read-only). [default: --db, "
                           "the model's own file]")(fn)
    return click.option("--sql", default=None,
                        help="A query whose rows are the corpus, one document each (the "
                             "first column's text), instead of files.")(fn)


def sql_corpus(corpus, sql, from_db, db_path, chat=None):
    """(corpus, chat) with --sql's rows in place of files: the corpus, or
    with --chat given no file, the conversations."""
    from ..store import sql_sources
    if sql is None:
        if chat == FROM_SQL:
            raise click.UsageError("--chat with no file reads its conversations from --sql: "
                                   "give --sql (or a JSON Lines file)")
        if from_db is not None:
            raise click.UsageError("--from goes with --sql")
        return corpus, chat
    if corpus:
        raise click.UsageError("--sql is the corpus: name no files too")
    sources = sql_sources(sql, from_db or db_path)
    if chat == FROM_SQL:
        return (), sources[0]
    if chat is not None:
        raise click.UsageError("--chat FILE and --sql are two corpora: give one")
    return sources, chat
