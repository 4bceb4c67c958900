"""SQL and pictures: sql (a query or a shell), datasette-metadata,
extension-path, plot and attention."""

import click

from .. import store
from ..api import load
from ..errors import SqlgptError
from .common import db_option, emit_json, fail_cleanly, output_option, shown_piece, threads_option


@click.command("extension-path")
@fail_cleanly
def extension_path_command():
    """Print where the loadable SQLite extension is, for `.load` in the
    sqlite3 shell or load_extension() in any SQLite client.

    Example: sqlite3 model.db ".load $(sqlgpt extension-path)" "SELECT sqlgpt_generate('the', 20)"
    """
    from ..sql.functions import extension_path
    click.echo(extension_path())



@click.command(name="datasette-metadata")
@db_option
@click.option("-o", "--output", "out_path", type=click.Path(), default=None,
              help="Write the JSON here. [default: standard output]")
@fail_cleanly
def datasette_metadata(db_path, prefix, out_path):
    """Datasette metadata for --db: table descriptions, the weight tables
    hidden from the index, and canned queries (see the README's ten).

    Example: sqlgpt datasette-metadata --db model.db -o metadata.json && datasette model.db -m metadata.json
    """
    from pathlib import Path
    from ..store.queries import metadata_json
    conn = store.open_database(db_path, prefix=prefix)  # a sqlgpt model this version reads
    version = store.schema_version(conn)
    conn.close()
    if version < 3:  # the canned queries read the tensors view and vocab.count
        raise SqlgptError(f"{db_path} has schema version {version}: its queries need version "
                          f"3 (sqlgpt train --resume upgrades it; sqlgpt compact writes an "
                          f"upgraded copy)")
    text = metadata_json(Path(db_path).stem, prefix)
    if out_path is None:
        click.echo(text)
        return
    try:
        Path(out_path).write_text(text + "\n")
    except OSError as e:
        raise SqlgptError(f"cannot write {out_path}: {e.strerror}") from None
    click.echo(f"wrote {out_path}")



@click.command()
@db_option
@output_option("The PNG file to write.")
@fail_cleanly
def plot(db_path, prefix, out_path):
    """Plot the learning curves of --db: training and validation loss,
    learning rate and gradient norm against step (needs matplotlib).

    Example: sqlgpt plot --db model.db -o curves.png
    """
    from ..interop.plot import plot_curves
    check_output_path(out_path)
    plot_curves(db_path, out_path, prefix)
    click.echo(f"wrote {out_path}")


@click.command()
@db_option
@click.option("--prompt", required=True, help="The text whose attention to draw.")
@output_option("The PNG file to write.")
@fail_cleanly
def attention(db_path, prefix, prompt, out_path):
    """Draw every layer's and head's attention map for --prompt (needs matplotlib).

    Example: sqlgpt attention --db model.db --prompt "the king" -o attn.png
    """
    from ..interop.plot import plot_attention
    check_output_path(out_path)
    plot_attention(load(db_path, prefix=prefix), prompt, out_path)
    click.echo(f"wrote {out_path}")


def check_output_path(path):
    from pathlib import Path
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SqlgptError(f"{path} must end in .png")
    if path.is_dir() or not path.parent.is_dir():
        raise SqlgptError(f"cannot write {path}: not a file in an existing directory")


@click.command()
@db_option
@click.argument("query", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print each row as a JSON object.")
@click.option("--write", is_flag=True, help="Open the file for writing (default: read-only).")
@threads_option
@fail_cleanly
def sql(db_path, prefix, query, as_json, write):
    """Run QUERY on --db with sqlite-vec and sqlgpt's SQL functions loaded
    (sqlgpt_generate, sqlgpt_tokens, sqlgpt_logprob, sqlgpt_embed), or,
    without QUERY, a shell of such queries (end each with ;).

    Example: sqlgpt sql --db model.db "SELECT name, l2 FROM tensors ORDER BY l2 DESC LIMIT 3"
    """
    from ..sql.functions import connect
    conn = connect(db_path, readonly=not write, prefix=prefix)
    try:
        if query is not None:
            run_query(conn, query, as_json)
        else:
            sql_shell(conn, as_json)
    finally:
        conn.close()


def run_query(conn, query, as_json):
    """Print a query's rows: aligned columns under a header, or JSON lines."""
    try:
        cursor = conn.execute(query)
        try:  # before fetching: apsw has no description once a statement is done
            names = [d[0] for d in cursor.description or ()]
        except Exception:  # apsw, a statement that returned no rows
            names = []
        rows = cursor.fetchall()
    except Exception as e:  # sqlite3's and apsw's errors, and the functions' own
        raise SqlgptError(f"SQL error: {e}") from None
    cells = [[shown_cell(v) for v in row] for row in rows]
    if as_json:
        for row in rows:
            emit_json({n: (f"<BLOB {len(v)} bytes>" if isinstance(v, bytes) else v)
                       for n, v in zip(names, row)})
        return
    if not names:
        return
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    click.echo("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def shown_cell(value):
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<BLOB {len(value)} bytes>"
    return shown_piece(str(value))


def sql_shell(conn, as_json):
    """Read statements (ended by ;) and print their rows; errors are shown
    and the shell goes on; Ctrl-D quits."""
    import importlib
    import sqlite3
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass
    buffer = ""
    while True:
        try:
            line = input("sqlgpt> " if not buffer else "   ...> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            buffer = ""
            continue
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            try:
                run_query(conn, buffer, as_json)
            except SqlgptError as e:
                click.echo(f"Error: {e}", err=True)
            buffer = ""


COMMANDS = (sql, datasette_metadata, extension_path_command, plot, attention)
