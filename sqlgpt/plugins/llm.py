"""llm plugin: sqlgpt models to prompt, chat with and embed through `llm`.

    llm -m sqlgpt:/path/to/model.db "the king"          # a model by its path
    llm sqlgpt register /path/to/chat.db --alias talk    # or by a name kept in llm's folder
    llm -m talk "Reverse: sword lady" -o temperature 0
    llm chat -m talk
    llm embed -m sqlgpt-embed:/path/to/model.db -c "some text"

A model fine-tuned for chat, or one that came with a chat template, is
prompted through its template (the system prompt and the conversation's
earlier turns included); any other continues the prompt's text. Options:
temperature, max_tokens, top_p, seed. llm logs every response, as it does
for any model.
"""
import json
import sys
from typing import Optional

import llm
from pydantic import Field

PREFIX, EMBED_PREFIX = "sqlgpt:", "sqlgpt-embed:"
REGISTRY = "sqlgpt-models.json"   # {alias: path}, in llm's user folder
_loaded = {}


def _load(path):
    from ..api import load
    if path not in _loaded:
        _loaded[path] = load(path)
    return _loaded[path]


def _registry():
    path = llm.user_dir() / REGISTRY
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def _named_on_the_command_line(prefix):
    """Model ids with prefix that this command names (-m / --model), so
    that `llm -m sqlgpt:PATH` needs no registering first."""
    args, found = sys.argv[1:], []
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("-m", "--model") and i + 1 < len(args) else \
            arg.split("=", 1)[1] if arg.startswith("--model=") else None
        if value and value.startswith(prefix):
            found.append(value)
    return found


class SqlgptModel(llm.Model):
    can_stream = True

    class Options(llm.Options):
        temperature: Optional[float] = Field(default=None, ge=0, le=2,
                                             description="Sampling temperature (0: greedy)")
        max_tokens: Optional[int] = Field(default=None, ge=1, le=100000,
                                          description="The most tokens to generate")
        top_p: Optional[float] = Field(default=None, gt=0, le=1, description="Nucleus sampling")
        seed: Optional[int] = Field(default=None, ge=0, description="Seed for reproducible text")

    def __init__(self, model_id, path):
        self.model_id, self.path = model_id, path

    def __str__(self):
        return f"sqlgpt: {self.model_id}"

    def execute(self, prompt, stream, response, conversation):
        model = _load(self.path)
        o = prompt.options
        sampling = dict(max_tokens=o.max_tokens or 256, temperature=1.0 if o.temperature is None
                        else o.temperature, top_p=o.top_p or 1.0, seed=o.seed)
        if model.chat_tuned:
            yield from model.chat_stream(self._messages(prompt, conversation), **sampling)
        else:
            pieces = model.stream(prompt.prompt, **sampling)
            next(pieces)  # the prompt's own text
            yield from pieces

    @staticmethod
    def _messages(prompt, conversation):
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        for earlier in (conversation.responses if conversation else []):
            messages += [{"role": "user", "content": earlier.prompt.prompt},
                         {"role": "assistant", "content": earlier.text()}]
        return messages + [{"role": "user", "content": prompt.prompt}]


class SqlgptEmbedding(llm.EmbeddingModel):
    batch_size = 32

    def __init__(self, model_id, path):
        self.model_id, self.path = model_id, path

    def embed_batch(self, texts):
        model = _load(self.path)
        for text in texts:
            yield [float(v) for v in model.embed(text if isinstance(text, str) else
                                                 text.decode("utf-8", "replace"))]


@llm.hookimpl
def register_models(register):
    for alias, path in _registry().items():
        register(SqlgptModel(PREFIX + path, path), aliases=(alias,))
    for model_id in _named_on_the_command_line(PREFIX):
        if model_id[len(PREFIX):] not in _registry().values():
            register(SqlgptModel(model_id, model_id[len(PREFIX):]))


@llm.hookimpl
def register_embedding_models(register):
    for alias, path in _registry().items():
        register(SqlgptEmbedding(EMBED_PREFIX + path, path), aliases=(f"{alias}-embed",))
    for model_id in _named_on_the_command_line(EMBED_PREFIX):
        if model_id[len(EMBED_PREFIX):] not in _registry().values():
            register(SqlgptEmbedding(model_id, model_id[len(EMBED_PREFIX):]))


@llm.hookimpl
def register_commands(cli):
    import click

    @cli.group(name="sqlgpt")
    def group():
        "sqlgpt models: register them by name"

    @group.command(name="register")
    @click.argument("path", type=click.Path(exists=True, dir_okay=False))
    @click.option("--alias", required=True, help="The name to prompt it by (-m NAME)")
    def register_model(path, alias):
        "Register a sqlgpt model database under a name (and NAME-embed)"
        from ..api import load
        from pathlib import Path
        load(path)  # a file that is not a model fails here, in one line
        registry = _registry()
        registry[alias] = str(Path(path).resolve())
        (llm.user_dir() / REGISTRY).write_text(json.dumps(registry, indent=2))
        click.echo(f"registered {alias}: {registry[alias]}")

    @group.command(name="models")
    def list_models():
        "The registered sqlgpt models"
        for alias, path in _registry().items():
            click.echo(f"{alias}: {path}")
