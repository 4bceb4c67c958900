"""serve: the models over HTTP in OpenAI's dialect (sqlgpt.serve)."""
from pathlib import Path

import click

from ..api import load
from ..errors import SqlgptError
from .common import fail_cleanly, precision_option, threads_option


def model_names(dbs, aliases):
    """{name: path}: each --db by its --alias, else its file's stem."""
    if len(aliases) > len(dbs):
        raise click.UsageError("more --alias than --db")
    names = list(aliases) + [Path(db).stem for db in dbs[len(aliases):]]
    if len(set(names)) != len(names):
        raise click.UsageError(f"two models would be called {names}: give each an --alias")
    return dict(zip(names, dbs))


@click.command()
@click.option("--db", "dbs", multiple=True, required=True, type=click.Path(),
              help="A model database to serve (repeatable).")
@click.option("--alias", "aliases", multiple=True,
              help="The name requests give each --db, in order. [default: the file's stem]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="The port (0: any free one).")
@click.option("--api-key", envvar="SQLGPT_API_KEY", default=None,
              help="Requests must send Authorization: Bearer KEY (also $SQLGPT_API_KEY).")
@click.option("--slots", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Sequences decoded together per model (continuous batching).")
@click.option("--ctx", type=click.IntRange(min=2), default=None,
              help="The longest prompt and reply together, at most the model's context. "
                   "[default: the model's]")
@click.option("--queue", "queue_limit", type=click.IntRange(1, 10**5), default=64,
              show_default=True, help="Requests that may wait for a slot (more: 429).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Let pages from this origin call the API (repeatable; * for any).")
@click.option("--no-webui", is_flag=True, help="Do not serve the chat page at /.")
@precision_option
@threads_option
@fail_cleanly
def serve(dbs, aliases, host, port, api_key, slots, ctx, queue_limit, cors_origins, no_webui,
          precision):
    """Serve the models in --db over HTTP, as OpenAI's API does (the openai
    client, llm, LangChain...: point them at http://HOST:PORT/v1), with a
    chat page at /. Ctrl-C finishes the requests in flight and exits.

    Example: sqlgpt serve --db chat.db --port 8000
    """
    try:
        from ..serve.app import serve as run
    except ImportError as e:
        raise SqlgptError(f"sqlgpt serve needs starlette and uvicorn ({e.name} is missing): "
                          f"pip install starlette uvicorn") from None
    models = {}
    for name, db in model_names(dbs, aliases).items():
        model = load(db, precision)
        if ctx is not None:
            model.context = min(ctx, model.arch.seq_len)
        models[name] = model
        click.echo(f"loaded {name}: {db}, {model.num_parameters():,} parameters, context "
                   f"{model.context}", err=True)

    def ready(runner):
        address = runner.servers[0].sockets[0].getsockname() if runner.servers else (host, port)
        where = f"http://{address[0]}:{address[1]}"
        click.echo(f"serving {', '.join(models)} at {where}/v1 with {slots} slots"
                   f"{'' if no_webui else f'; chat page at {where}/'} (Ctrl-C stops)", err=True)
    run(models, host, port, on_ready=ready, slots=slots, api_key=api_key,
        cors_origins=cors_origins, webui=not no_webui, queue_limit=queue_limit)


COMMANDS = (serve,)
