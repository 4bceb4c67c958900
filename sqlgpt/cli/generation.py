"""generate, eval and tokenize: text from a model (batches, streams, a
draft model, an interactive loop), its loss on a corpus, its tokens."""
import sys
import time

import click

from ..api import load
from ..data.corpus import ENCODING_ERRORS
from ..errors import SqlgptError
from ..inference.sampling import Sampler
from ..inference.beam import MAX_BEAMS
from ..inference.generate import DRAFT_TOKENS, GenerationStats, MAX_BATCH
from .training import read_template
from .common import (FROM_SQL, sql_corpus, sql_options,
                     checked_prefix, db_option, emit_json, fail_cleanly, precision_option,
                     sampling_options, shown_piece, step_option, threads_option, typed_lines)


@click.command()
@db_option
@click.option("--prompt", default="", help="Text to continue (empty: a new document, after <eos>; with the word "
                   "tokenizer, from the commonest word).")
@sampling_options
@click.option("--allow-unk", is_flag=True, help="Let the model emit <unk> (out-of-vocabulary).")
@precision_option
@click.option("--num-samples", type=click.IntRange(1, MAX_BATCH), default=1, show_default=True,
              help="Samples of each prompt, generated together as one batch.")
@click.option("--prompts-file", type=click.Path(), default=None,
              help="One prompt a line (UTF-8), all generated together as one batch.")
@click.option("--stream/--no-stream", default=None,
              help="Print tokens as they come. [default: on a terminal]")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON line per sample: prompt, text, tokens, tokens_per_s.")
@click.option("--interactive", is_flag=True,
              help="A prompt loop (line editing, history): Ctrl-C stops an answer, Ctrl-D quits.")
@click.option("--draft-db", type=click.Path(), default=None,
              help="Speculative decoding: a smaller model with the same tokenizer proposes "
                   "tokens that this one checks in one step (the same output distribution).")
@click.option("--draft-prefix", default="", callback=checked_prefix,
              help="The draft model's table prefix in --draft-db.")
@click.option("--draft-tokens", type=click.IntRange(1, 32), default=DRAFT_TOKENS,
              show_default=True, help="Tokens the draft proposes per step.")
@click.option("--num-beams", type=click.IntRange(1, MAX_BEAMS), default=1, show_default=True,
              help="Beam search: keep this many continuations at each step and print the most "
                   "likely (1: sampling as set; with --json, every beam and its score).")
@click.option("--length-penalty", type=float, default=1.0, show_default=True,
              help="Beam search ranks by log-probability / tokens ** this (0: by probability "
                   "alone; higher favours longer text).")
@click.option("--chat", "as_chat", is_flag=True,
              help="One chat turn: --prompt is the user's message, rendered by the model's chat "
                   "template; the reply alone is printed.")
@click.option("--system", default=None, help="With --chat: a system message first.")
@click.option("--chat-template", type=click.Path(), default=None,
              help="With --chat: a Jinja chat template file instead of the model's own.")
@step_option
@threads_option
@fail_cleanly
def generate(db_path, prefix, prompt, max_tokens, temperature, top_k, top_p, min_p,
             repetition_penalty, stop, seed, allow_unk, precision, num_samples, prompts_file,
             stream, as_json, interactive, draft_db, draft_prefix, draft_tokens, num_beams,
             length_penalty, as_chat, system, chat_template, step):
    """Generate text from the model in --db, streaming tokens as they come
    on a terminal.

    Example: sqlgpt generate --db model.db --prompt "the king" --max-tokens 30
    """
    prompts = read_prompts(prompts_file) if prompts_file else None
    if prompts is not None and prompt:
        raise click.UsageError("--prompt and --prompts-file exclude each other")
    batched = prompts is not None or num_samples > 1
    if draft_db and batched:
        raise click.UsageError("--draft-db generates one sequence at a time: drop "
                               "--num-samples / --prompts-file")
    if interactive and (batched or as_json):
        raise click.UsageError("--interactive takes one prompt at a time, as text")
    if (system is not None or chat_template) and not as_chat:
        raise click.UsageError("--system and --chat-template go with --chat")
    if as_chat and (batched or draft_db or interactive or allow_unk):
        raise click.UsageError("--chat is one turn of one conversation (sqlgpt chat holds a "
                               "conversation): drop --num-samples, --prompts-file, --draft-db, "
                               "--interactive and --allow-unk")
    if num_beams > 1 and (batched or draft_db or interactive):
        raise click.UsageError("--num-beams searches one prompt: drop --num-samples, "
                               "--prompts-file, --draft-db and --interactive")
    model = load(db_path, precision, step, prefix)
    if num_beams > 1:
        return print_beams(model, prompt, num_beams, max_tokens, length_penalty, allow_unk,
                           as_json, (system, read_template(chat_template)) if as_chat else None)
    options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, allow_unk=allow_unk, stop=stop, min_p=min_p,
                   repetition_penalty=repetition_penalty)
    if draft_db:
        # a draft reads float weights (bf16 beside an integer model: it has no copies of its own)
        draft = load(draft_db, precision if precision in ("fp32", "bf16", "f16") else "bf16",
                     prefix=draft_prefix)
        model.check_draft(draft)
        options.update(draft=draft, draft_tokens=draft_tokens)
    Sampler(temperature, top_k, top_p, min_p, repetition_penalty)  # bad settings: one line
    if interactive:
        return interactive_loop(model, options)
    if as_chat:
        return chat_turn(model, prompt, system, read_template(chat_template), options, stream,
                         as_json)
    for text in (prompts or [prompt]):
        note_long_prompt(model, text)
    if batched:
        completions = model.complete([p for p in (prompts or [prompt]) for _ in
                                      range(num_samples)], **options)
        for c in completions:
            if as_json:
                emit_json({"prompt": c.prompt, "text": c.text, "tokens": c.tokens,
                           "tokens_per_s": round(c.tokens_per_s, 1)})
            else:
                click.echo(c.text + "\n")
        if not as_json:
            total = sum(c.tokens for c in completions)
            click.echo(f"{len(completions)} samples, {total:,} tokens, "
                       f"{total / max(completions[0].seconds, 1e-9):,.0f} tokens/s", err=True)
        return
    stats = GenerationStats()
    print_stream(model.stream(prompt, stats=stats, **options), stats, stream, as_json,
                 {"prompt": prompt}, "text")
    if draft_db:
        click.echo(f"draft: {stats.accepted} of {stats.proposed} proposed tokens accepted "
                   f"({stats.acceptance:.0%}), {stats.steps} target steps", err=True)


def print_beams(model, prompt, num_beams, max_tokens, length_penalty, allow_unk, as_json, chat):
    """generate --num-beams: the best continuation (or chat reply), or with
    --json every beam with its score."""
    if chat is not None:
        system, template = chat
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt}]
        beams = model.chat_beams(messages, num_beams, max_tokens, length_penalty, template)
    else:
        beams = model.beam_search(prompt, num_beams, max_tokens, length_penalty, allow_unk)
    if as_json:
        emit_json({"prompt": prompt, "beams": [
            {"text": b.text, "score": round(b.score, 6), "logprob": round(b.logprob, 6),
             "tokens": len(b.ids), "finished": b.finished} for b in beams]})
    else:
        click.echo(beams[0].text if chat is not None else prompt + beams[0].text)


def chat_turn(model, prompt, system, template, options, stream, as_json):
    """generate --chat: the reply to one user message, streamed on a terminal."""
    del options["allow_unk"]
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    stats = GenerationStats()
    print_stream(model.chat_stream(messages, template=template, stats=stats, **options), stats,
                 stream, as_json, {"messages": messages}, "reply")


def print_stream(pieces, stats, stream, as_json, request, key):
    """Print text as its pieces come (stream: None is on a terminal), or
    whole at the end, or as one JSON line: request, key: the text, tokens
    and tokens_per_s."""
    shown = sys.stdout.isatty() if stream is None else stream
    start, kept = time.perf_counter(), []
    for piece in pieces:
        kept.append(piece)
        if shown and not as_json:
            click.echo(piece, nl=False)
    seconds = time.perf_counter() - start
    text = "".join(kept)
    if as_json:
        emit_json({**request, key: text, "tokens": stats.tokens,
                   "tokens_per_s": round(stats.tokens / seconds, 1) if seconds else 0.0})
    else:
        click.echo("" if shown else text)


def read_prompts(path):
    """The lines of a prompts file, each a prompt; an empty line is an error."""
    from pathlib import Path
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SqlgptError(f"cannot read the prompts file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SqlgptError(f"the prompts file {path} is not UTF-8 text") from None
    if "\x00" in text:
        raise SqlgptError(f"the prompts file {path} is binary, not text")
    lines = text.splitlines()
    if not lines:
        raise SqlgptError(f"the prompts file {path} is empty")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise SqlgptError(f"line {number} of {path} is empty: one prompt a line")
    if len(lines) > MAX_BATCH:
        raise SqlgptError(f"{path} has {len(lines)} prompts: a batch holds at most {MAX_BATCH}")
    return lines


def note_long_prompt(model, prompt):
    n, T = len(model.encode(prompt)), model.arch.seq_len
    if n > T:
        click.echo(f"note: the prompt is {n} tokens, longer than the model's context of {T}: "
                   f"only its last {T} are used", err=True)


def interactive_loop(model, options):
    """Read a prompt, stream its answer, again; Ctrl-C ends an answer (or
    clears the line), Ctrl-D or EOF quits."""
    click.echo("sqlgpt: type a prompt and press Enter; Ctrl-C stops an answer, Ctrl-D quits.",
               err=True)
    for prompt in typed_lines():
        note_long_prompt(model, prompt)
        try:
            for piece in model.stream(prompt, **options):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        except SqlgptError as e:
            click.echo(f"error: {e}", err=True)
        click.echo()


def eval_progress():
    """eval's progress on stderr: a line that redraws itself on a terminal,
    else a line at every tenth of the windows (a log, a CI job)."""
    shown = [-1]

    def report(done, total):
        tenth = done * 10 // total
        if sys.stderr.isatty():
            click.echo(f"\rscoring: {done:,} of {total:,} windows", err=True,
                       nl=done == total)
        elif tenth > shown[0] and total > 1:
            shown[0] = tenth
            click.echo(f"scoring: {done:,} of {total:,} windows ({done / total:.0%})", err=True)
    return report


@click.command(name="eval")
@click.argument("corpus", nargs=-1, type=click.Path())
@db_option
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Windows of seq-len tokens this far apart; each token after the first "
                   "window has at least seq-len - stride tokens of context (1: all of it, "
                   "slowest). [default: seq-len / 2]")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows scored at once.")
@click.option("--ext", "extensions", multiple=True,
              help="With a directory: only files with this suffix (repeatable).")
@click.option("--encoding-errors", type=click.Choice(ENCODING_ERRORS), default="strict",
              show_default=True, help="Bytes that are not UTF-8: an error, or U+FFFD.")
@click.option("--chat", "chat", type=click.Path(), default=None, is_flag=False,
              flag_value=FROM_SQL,
              help="Score held-out conversations (JSON Lines, as finetune --chat reads; alone "
                   "with --sql, the rows' messages) instead of a corpus: the assistant's tokens "
                   "alone, and the greedy reply's exact match with each conversation's last "
                   "message.")
@sql_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@precision_option
@step_option
@threads_option
@fail_cleanly
def eval_(corpus, db_path, prefix, stride, batch_size, extensions, encoding_errors, chat, sql,
          from_db, as_json, precision, step):
    """Score the model in --db on CORPUS (files, directories or -): mean
    cross-entropy per token, perplexity and next-token accuracy; with
    --precision, of the weights in that format, as generation reads them.

    Example: sqlgpt eval --db model.db held_out.txt --json
    """
    corpus, chat = sql_corpus(corpus, sql, from_db, db_path, chat)
    if bool(corpus) == bool(chat):
        raise click.UsageError("name a corpus to score (files or --sql), or --chat "
                               "conversations: one of them")
    model = load(db_path, precision, step, prefix)
    if chat:
        scores = model.evaluate_chat(chat, batch_size)
        if as_json:
            return emit_json(scores)
        exact = "" if scores["exact_match"] is None else \
            f", exact match {scores['exact_match']:.1%}"
        click.echo(f"loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f}, accuracy "
                   f"{scores['accuracy']:.1%} on {scores['tokens']:,} assistant tokens{exact}, "
                   f"{scores['conversations']:,} conversations")
        return
    result = model.evaluate(paths=corpus, stride=stride, batch_size=batch_size,
                            extensions=extensions, encoding_errors=encoding_errors,
                            on_progress=eval_progress())
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
               f"accuracy {result.accuracy:.1%}, {result.tokens:,} tokens")


@click.command()
@db_option
@click.argument("text", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@sql_options
@fail_cleanly
def tokenize(db_path, prefix, text, as_json, sql, from_db):
    """Show how the model in --db splits TEXT: each token's id and piece;
    with --sql, each row's token count (and ids, with --json).

    Example: sqlgpt tokenize --db model.db "The king's crown"
    """
    if (text is None) == (sql is None):
        raise click.UsageError("give a TEXT to tokenize, or --sql rows: one of them")
    model = load(db_path, prefix=prefix)
    if sql is not None:
        return tokenize_rows(model, sql_corpus((), sql, from_db, db_path)[0][0], as_json)
    ids = [int(i) for i in model.encode(text)]
    pieces = model.tokenizer.pieces(ids)
    if as_json:
        emit_json({"ids": ids, "pieces": pieces, "tokens": len(ids)})
        return
    for token, piece in zip(ids, pieces):
        click.echo(f"{token:>7}  '{shown_piece(piece)}'")
    click.echo(f"{len(ids)} tokens")


def tokenize_rows(model, source, as_json):
    """tokenize --sql: each row's tokens, then the total."""
    rows = total = 0
    for rows, text in enumerate(source.rows(), 1):
        ids = [int(i) for i in model.encode(text)]
        total += len(ids)
        if as_json:
            emit_json({"row": rows, "ids": ids, "tokens": len(ids)})
        else:
            click.echo(f"row {rows}: {len(ids):,} tokens")
    if not as_json:
        click.echo(f"{rows:,} rows, {total:,} tokens")


@click.command()
@db_option
@click.argument("texts", nargs=-1)
@click.option("--scores", is_flag=True, help="Show every label's probability.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per text: its label and every label's probability.")
@sql_options
@fail_cleanly
def classify(db_path, prefix, texts, scores, as_json, sql, from_db):
    """Label each TEXT (or each --sql row's first column) with the classifier
    in --db (made by finetune --task classify): one line per text, the label
    then the text.

    Example: sqlgpt classify --db clf.db "a joyful crown" "a night of woe"
    """
    if bool(texts) == (sql is not None):
        raise click.UsageError("give TEXTs to classify, or --sql rows: one of them")
    model = load(db_path, prefix=prefix)
    rows = list(texts) if texts else list(sql_corpus((), sql, from_db, db_path)[0][0].rows())
    for start in range(0, len(rows), CLASSIFY_BATCH):
        batch = rows[start:start + CLASSIFY_BATCH]
        for text, probs in zip(batch, model.classify_scores(batch)):
            label = max(probs, key=probs.get)
            if as_json:
                emit_json({"text": text, "label": label, "scores": probs})
            elif scores:
                shown = ", ".join(f"{name} {p:.3f}" for name, p in probs.items())
                click.echo(f"{label}\t{text}\t({shown})")
            else:
                click.echo(f"{label}\t{text}")


CLASSIFY_BATCH = 256  # texts scored per call: memory stays flat over a long --sql

COMMANDS = (generate, eval_, tokenize, classify)
