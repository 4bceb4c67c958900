"""chat: a conversation with a model in a terminal, rendered by its chat
template, replies streamed as they come."""
import copy

import click

from ..api import load
from ..errors import SqlgptError
from .common import (db_option, fail_cleanly, precision_option, sampling_options, step_option,
                     threads_option, typed_lines)
from .training import read_template

HELP = ("/system TEXT sets the system message, /reset forgets the conversation, /help shows "
        "this; Ctrl-C stops a reply, Ctrl-D quits.")


def trimmed(model, messages, template):
    """messages without their oldest turns (the system message stays) until
    they leave the context room for a reply; the reply's prompt ids."""
    while True:
        try:
            return messages, model.chat_prompt(messages, template)
        except SqlgptError:
            turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
            if len(turns) <= 1:
                raise
            # drop the oldest exchange: the first turn and whatever follows it up to the next user
            nxt = next((i for i in turns[1:] if messages[i]["role"] == "user"), turns[-1])
            messages = [m for i, m in enumerate(messages) if i < turns[0] or i >= nxt]


def reply(model, messages, template, options):
    """Stream the assistant's reply to messages; its text (cut short by
    Ctrl-C)."""
    pieces = []
    try:
        for piece in model.chat_stream(messages, template=template, **options):
            pieces.append(piece)
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        click.echo(" [stopped]", nl=False)
    click.echo()
    return "".join(pieces)


def command_line(text, messages):
    """A /command's effect on the conversation, or None for a message."""
    word, _, rest = text.strip().partition(" ")
    if word == "/reset":
        click.echo("(the conversation is forgotten)", err=True)
        return [m for m in messages if m["role"] == "system"]
    if word == "/system":
        click.echo("(system message set)" if rest.strip() else "(system message removed)",
                   err=True)
        turns = [m for m in messages if m["role"] != "system"]
        return ([{"role": "system", "content": rest.strip()}] if rest.strip() else []) + turns
    if word in ("/help", "/?"):
        click.echo(HELP, err=True)
        return messages
    return None


@click.command()
@db_option
@click.option("--system", default=None, help="The system message the conversation starts with.")
@click.option("--chat-template", type=click.Path(), default=None,
              help="A Jinja chat template file to use instead of the model's own.")
@sampling_options
@precision_option
@step_option
@threads_option
@fail_cleanly
def chat(db_path, prefix, system, chat_template, precision, step, **options):
    """Talk with the model in --db: each line you type is a user message,
    the reply streams as it comes (rendered by the model's chat template,
    or sqlgpt's default); older turns are dropped when the conversation
    outgrows the context.

    Example: sqlgpt chat --db chat.db --system "Answer briefly." --temperature 0.7
    """
    model = load(db_path, precision, step, prefix)
    template = read_template(chat_template)
    model.chat_format(template)  # a template that cannot render fails here, in one line
    messages = [{"role": "system", "content": system}] if system else []
    click.echo(f"sqlgpt chat with {db_path}: {HELP}", err=True)
    for text in typed_lines():
        changed = command_line(text, messages) if text.startswith("/") else None
        if changed is not None:
            messages = changed
            continue
        try:
            messages, _ = trimmed(model, messages + [{"role": "user", "content": text}],
                                  template)
            messages.append({"role": "assistant",
                             "content": reply(model, messages, template, options)})
        except SqlgptError as e:
            click.echo(f"error: {e}", err=True)
            messages = [m for m in messages if m["role"] == "system"]


def _longer_replies(command):
    """A chat's replies run longer than generate's default continuation."""
    for i, param in enumerate(command.params):
        if param.name == "max_tokens":
            param = copy.copy(param)
            param.default = 256
            command.params[i] = param
    return command


COMMANDS = (_longer_replies(chat),)
