"""train, finetune and merge: a new model, a LoRA fine-tune, resuming, with
progress on a terminal and one line per checkpoint elsewhere."""
import copy
import functools
import hashlib
import math
import os
import sys

import click

from .. import set_threads
from ..train import distributed
from ..contract import MLPS, NORMS, POOLS, POSITIONS
from ..model.arch import PRESETS, ArchConfig, preset
from ..model.config import OPTIMIZERS, SCHEDULES, TOKENIZER_KINDS, TrainConfig, read_run_file
from ..data.corpus import ENCODING_ERRORS, find_sources, fingerprint
from ..errors import AlreadyTrained, SqlgptError
from ..model.lora import LoraConfig
from ..train.trainer import Trainer
from ..chat.template import MAX_TEMPLATE_CHARS
from .common import (FROM_SQL, db_option, emit_json, fail_cleanly, fmt_loss, output_option,
                     sql_corpus, sql_options, threads_option)


EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
PRESET_TOKENIZER = {"lua": "word", "gpt2": "bpe", "llama": "bpe"}
# --vocab-size when not given: words kept; every character (0); bytes have
# no size; BPE ids in all (specials and the 256 bytes included)
DEFAULT_VOCAB = {"word": 426, "char": 0, "byte": 0, "bpe": 2048}
DEFAULTS, ARCH_DEFAULTS, LORA_DEFAULTS = TrainConfig(), ArchConfig(), LoraConfig()

# option name -> ArchConfig field, for the options that shape a new model's
# architecture; those not given on the command line keep the preset's value
ARCH_OPTIONS = {
    "embed_dim": "embed_dim", "heads": "num_heads", "layers": "num_layers",
    "seq_len": "seq_len", "kv_heads": "kv_heads", "head_size": "head_size", "norm": "norm",
    "norm_affine": "norm_affine", "norm_eps": "norm_eps", "pos": "pos",
    "rope_theta": "rope_theta", "mlp": "mlp", "ffn_dim": "ffn_dim", "bias": "bias",
    "qkv_bias": "qkv_bias", "tie_weights": "tie_weights", "final_norm": "final_norm",
}
# option name -> TrainConfig field (vocab_size and tokenizer have defaults per tokenizer)
TRAIN_OPTIONS = {
    "batch_size": "batch_size", "lr": "lr", "dropout": "dropout",
    "seed": "seed", "weight_decay": "weight_decay", "lr_schedule": "lr_schedule",
    "warmup": "warmup_iters", "grad_clip": "grad_clip", "optimizer": "optimizer",
    "beta1": "beta1", "beta2": "beta2", "eps": "eps", "momentum": "momentum",
    "grad_accum": "grad_accum", "lr_decay_iters": "lr_decay_iters", "min_lr": "min_lr",
    "val_fraction": "val_fraction", "eval_every": "eval_every", "eval_iters": "eval_iters",
    "dropout_final": "dropout_final", "val_file": "val_file",
}
# stored settings a resumed run may change: results do not depend on them
RUN_OPTIONS = ("checkpoint_activations", "keep")
# every option that is a stored setting -> its field
SETTING_FIELDS = {**ARCH_OPTIONS, **TRAIN_OPTIONS, "preset": "preset", "tokenizer": "tokenizer",
                  "vocab_size": "vocab_size"}



def load_run_file(ctx, param, path):
    """--config: the file's settings become the defaults of train's options
    (options given on the command line override them)."""
    if path is None:
        return None
    try:
        values = read_run_file(path)
    except SqlgptError as e:
        raise click.BadParameter(str(e)) from None
    names = {p.name: p for p in ctx.command.params}
    names["db"] = names.pop("db_path")
    unknown = sorted(set(values) - set(names) - {"config"})
    if unknown:
        raise click.BadParameter(f"{path} sets unknown option(s): {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}),
                       **{("db_path" if k == "db" else k): v for k, v in values.items()}}
    return path


@click.command()
@click.argument("corpus", nargs=-1, type=click.Path())
@click.option("--config", "config_file", type=click.Path(), is_eager=True, expose_value=False,
              callback=load_run_file,
              help="A .yaml or .toml file of option values (names as the options, e.g. "
                   "embed-dim: 128); options given here override it.")
@db_option
@click.option("--preset", type=click.Choice(list(PRESETS)), default=ARCH_DEFAULTS.preset,
              show_default=True,
              help="Model architecture: lua (the original), gpt2 or llama.")
@click.option("--embed-dim", type=int, default=ARCH_DEFAULTS.embed_dim, show_default=True,
              help="Width of the model.")
@click.option("--heads", type=int, default=ARCH_DEFAULTS.num_heads, show_default=True,
              help="Attention heads (must divide --embed-dim unless --head-size is given).")
@click.option("--head-size", type=int, default=None,
              help="Each attention head's width, when heads x head size is not --embed-dim "
                   "(as Qwen3's and Gemma's are). [default: --embed-dim / --heads]")
@click.option("--kv-heads", type=int, default=None,
              help="Key/value heads for grouped-query attention (must divide --heads; "
                   "1 = multi-query). [default: --heads]")
@click.option("--layers", type=int, default=ARCH_DEFAULTS.num_layers, show_default=True,
              help="Transformer blocks.")
@click.option("--seq-len", type=int, default=ARCH_DEFAULTS.seq_len, show_default=True,
              help="Context length in tokens.")
@click.option("--norm", type=click.Choice(NORMS), default=None,
              help="Normalization. [default: the preset's]")
@click.option("--norm-affine/--no-norm-affine", default=None,
              help="Learned norm gains (and biases with --bias). [default: the preset's]")
@click.option("--norm-eps", type=float, default=None,
              help="Epsilon inside the norms. [default: 1e-5]")
@click.option("--pos", type=click.Choice(POSITIONS), default=None,
              help="Position scheme. [default: the preset's]")
@click.option("--rope-theta", type=float, default=None,
              help="Base of the rotary angles. [default: 10000]")
@click.option("--mlp", type=click.Choice(MLPS), default=None,
              help="MLP kind. [default: the preset's]")
@click.option("--ffn-dim", type=int, default=None,
              help="MLP hidden size. [default: 4 x --embed-dim; for swiglu 2/3 of that, "
                   "rounded up to a multiple of 32]")
@click.option("--bias/--no-bias", default=None,
              help="Biases on every linear and layernorm. [default: the preset's]")
@click.option("--qkv-bias/--no-qkv-bias", default=None,
              help="Biases on the q, k and v projections alone, as Qwen2 has. [default: no]")
@click.option("--tie-weights/--no-tie-weights", default=None,
              help="Head shares wte's weights. [default: the preset's]")
@click.option("--final-norm/--no-final-norm", default=None,
              help="A norm before the head. [default: the preset's]")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
              help="Sequences per step.")
@click.option("--tokenizer", type=click.Choice(TOKENIZER_KINDS), default=None,
              help="word (lua's default: lower-cased words), char, byte, or bpe (byte-level "
                   "BPE; the default of gpt2 and llama).")
@click.option("--ext", "extensions", multiple=True,
              help="With a directory as CORPUS: read only files with this suffix "
                   "(repeatable, e.g. --ext .txt --ext .md).")
@click.option("--encoding-errors", type=click.Choice(ENCODING_ERRORS), default="strict",
              show_default=True,
              help="Bytes that are not UTF-8: an error, or replace them with U+FFFD.")
@click.option("--vocab-size", type=int, default=None,
              help="word: most frequent words kept (plus <pad> and <unk>) [426]; char: most "
                   "frequent characters kept [0: all]; bpe: token ids in all, at least 260 "
                   "[2048]; byte: not used.")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Learning rate.")
@click.option("--lr-schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.lr_schedule,
              show_default=True,
              help="constant, or cosine or linear decay to --min-lr at --lr-decay-iters.")
@click.option("--lr-decay-iters", type=click.IntRange(min=1), default=None,
              help="Step where the decay ends, stored with the model, so a resumed run to "
                   "more --iters keeps the curve. [default: --iters]")
@click.option("--min-lr", type=float, default=None,
              help="Learning rate at the end of the decay. [default: lr/10]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer,
              show_default=True,
              help="adamw (decoupled weight decay), adam (decay added to the gradient, L2) "
                   "or sgd.")
@click.option("--beta1", type=float, default=DEFAULTS.beta1, show_default=True,
              help="Adam's first-moment decay.")
@click.option("--beta2", type=float, default=DEFAULTS.beta2, show_default=True,
              help="Adam's second-moment decay.")
@click.option("--eps", type=float, default=DEFAULTS.eps, show_default=True,
              help="Adam's epsilon.")
@click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True,
              help="SGD momentum.")
@click.option("--val-fraction", type=float, default=DEFAULTS.val_fraction, show_default=True,
              help="The corpus tail held out for evaluation (0: none).")
@click.option("--val-file", type=click.Path(), default=None,
              help="A held-out text to evaluate on instead of the corpus tail (the whole "
                   "corpus then trains).")
@click.option("--eval-every", type=click.IntRange(min=0), default=DEFAULTS.eval_every,
              show_default=True, help="Evaluate every N steps (0: at each checkpoint).")
@click.option("--eval-iters", type=click.IntRange(min=0), default=DEFAULTS.eval_iters,
              show_default=True,
              help="Batches of the held-out split per evaluation (0: all of it).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=DEFAULTS.grad_accum,
              show_default=True,
              help="Micro-batches of --batch-size per step (the same step as one batch that "
                   "many times larger).")
@click.option("--warmup", type=int, default=DEFAULTS.warmup_iters, show_default=True,
              help="Linear learning-rate warm-up steps.")
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True,
              help="Weight decay of matrices and embeddings only (never norm gains or "
                   "biases): decoupled with adamw, L2 with adam and sgd.")
@click.option("--dropout", type=float, default=DEFAULTS.dropout, show_default=True,
              help="Dropout rate while training.")
@click.option("--dropout-final", type=float, default=None,
              help="Anneal dropout linearly from --dropout to this at --lr-decay-iters. "
                   "[default: no annealing]")
@click.option("--checkpoint-activations/--no-checkpoint-activations", default=False,
              show_default=True,
              help="Keep only each block's input and recompute the rest in backward: "
                   "activation memory of one block instead of all, about a third more "
                   "compute, the same gradients bit for bit.")
@click.option("--keep", type=click.IntRange(0, 10**6), default=DEFAULTS.keep, show_default=True,
              help="Keep the weights of the last N checkpoints (and of the best by validation "
                   "loss) for generate --step and SQL; 0 keeps only the latest.")
@click.option("--stop-on-divergence", is_flag=True,
              help="Stop (keeping the last checkpoint) when the loss climbs past 3x its "
                   "start; without it, a warning.")
@click.option("--iters", type=click.IntRange(1, 2**31 - 1), default=DEFAULTS.max_iters,
              show_default=True,
              help="Train up to this step in total.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=DEFAULTS.seed, show_default=True,
              help="Seed for weights, batches and dropout.")
@click.option("--save-every", type=click.IntRange(1, 2**31 - 1), default=100,
              show_default=True,
              help="Checkpoint every N steps (and always at the end).")
@click.option("--grad-clip", type=float, default=0.0, show_default=True,
              help="Clip the global gradient norm to this (0 = off).")
@click.option("--max-bad-steps", type=int, default=10, show_default=True,
              help="Stop when more than this many steps had a NaN/Inf loss or gradient.")
@click.option("--resume", is_flag=True, help="Continue training the model in --db.")
@click.option("--init-from", "--base", "init_from", type=click.Path(), default=None,
              help="Start a new model in --db from a trained database's architecture, "
                   "tokenizer and weights (fresh optimizer state; the base is only read).")
@click.option("--chat", "chat", type=click.Path(), default=None, is_flag=False,
              flag_value=FROM_SQL,
              help="Fine-tune the --base model on conversations (JSON Lines of {\"messages\": "
                   "[{\"role\", \"content\"}...]} or {\"prompt\", \"completion\"}) "
                   "instead of a corpus: the loss counts the assistant's tokens alone. --chat "
                   "alone with --sql: each row's first column is a conversation's messages.")
@sql_options
@click.option("--task", type=click.Choice(["generate", "classify"]), default="generate",
              show_default=True,
              help="classify: fine-tune --base into a classifier of the labelled rows "
                   "(--sql's two columns text, label; or a .csv/.jsonl file with text and "
                   "label), a head on its pooled final hidden state.")
@click.option("--pool", type=click.Choice(POOLS), default="last", show_default=True,
              help="How a classifier reads a text: its last token's final hidden state, or "
                   "the mean over its tokens.")
@click.option("--chat-template", "chat_template", type=click.Path(), default=None,
              help="With --chat: a Jinja chat template file to render the conversations with "
                   "(kept with the model). [default: the base's, else sqlgpt's]")
@click.option("--lora-rank", type=click.IntRange(min=0), default=None,
              help="Train LoRA adapters of this rank on the --base model instead of all of its "
                   "weights (finetune: 8).")
@click.option("--lora-alpha", type=float, default=LORA_DEFAULTS.alpha, show_default=True,
              help="LoRA's scale numerator: the adapters' update is scaled by alpha / rank.")
@click.option("--lora-targets", default=LORA_DEFAULTS.targets, show_default=True,
              help="The matrices to adapt, comma-separated: q, k, v, proj, gate (swiglu), fc1, "
                   "fc2.")
@click.option("--lora-dropout", type=float, default=LORA_DEFAULTS.dropout, show_default=True,
              help="Dropout on each adapter's input while training.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --db with a new model.")
@click.option("--zero", type=click.IntRange(0, 1), default=0, show_default=True,
              help="Under mpirun: 1 keeps on each rank only its shard of the optimizer's "
                   "moments (ZeRO-1); 0 keeps all of them on every rank.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary as the last line of stdout.")
@click.pass_context
@threads_option
@fail_cleanly
def train(ctx, corpus, db_path, prefix, iters, save_every, max_bad_steps, resume, as_json,
          stop_on_divergence, zero, **options):
    """Train a model on CORPUS (UTF-8 text files, directories, or - for
    standard input) into the database --db. Under mpirun, the processes
    train one model together (data-parallel): see the README.

    Example: sqlgpt train examples/tinyshakespeare.txt --db model.db --iters 500
    """
    world = distributed.world(zero)
    try:
        with distributed.collective(world):
            if world.size > 1:
                check_ranks(ctx, world, corpus, options["extensions"])
            trainer = Trainer.spread(world, world.on_root(functools.partial(
                open_trainer, ctx, corpus, db_path, prefix, iters, resume, **options)))
            changed = getattr(trainer, "changed_settings", None)
            if world.is_root and changed:
                click.echo(f"resuming at step {trainer.state['step']} with "
                           f"{', '.join(changed)}", err=True)
            try:
                result = run_with_progress(trainer, iters, save_every, max_bad_steps,
                                           stop_on_divergence, quiet=not world.is_root)
            finally:
                trainer.close()
    except AlreadyTrained as done:
        if world.is_root:
            click.echo(f"{db_path} is already trained to step {done.step} (train loss "
                       f"{fmt_loss(done.train_loss)}); nothing to do: raise --iters", err=True)
            if as_json:
                emit_json({"step": done.step, "final_loss": done.train_loss,
                           "tokens_per_sec": 0.0, "steps_run": 0, "db": db_path})
        return
    if world.is_root:
        report_training(trainer, result, db_path, as_json)
    if result.stopped_by:  # a diverged run is rank 0's error above; the other ranks exit 1
        sys.exit(EXIT_ON_SIGNAL.get(result.stopped_by, 1))


def check_ranks(ctx, world, corpus, extensions):
    """Refuse, on every rank, a job whose ranks run other code, options or
    corpus, or a new model's batch too small to share; set each rank's
    threads to its share of the host's cores (within the ones it may use)."""
    # the corpus by its content (its path may differ from host to host)
    options = sorted((name, value) for name, value in ctx.params.items() if name != "corpus")
    identity = {"sqlgpt version": distributed.code_digest(),
                "options": hashlib.sha256(repr(options).encode()).hexdigest()}
    try:
        if "-" in corpus:
            raise SqlgptError("under mpirun standard input reaches rank 0 only: name the "
                              "corpus files")
        identity["corpus"] = fingerprint(find_sources(corpus, extensions)) if corpus else ""
    except SqlgptError as e:
        identity["corpus"] = e
    world.check_same(identity)
    if not ctx.params["resume"] and ctx.params["batch_size"] < world.size:
        raise distributed.Agreed(SqlgptError(distributed.batch_too_small(
            ctx.params["batch_size"], world.size)))
    if (ctx.get_parameter_source("threads") == click.core.ParameterSource.DEFAULT
            and "OMP_NUM_THREADS" not in os.environ):
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
        set_threads(max(1, min(usable, (os.cpu_count() or 1) // world.local_size)))


def open_trainer(ctx, corpus, db_path, prefix, iters, resume, overwrite, extensions,
                 encoding_errors, init_from, lora_rank, lora_alpha, lora_targets, lora_dropout,
                 chat, chat_template, sql, from_db, task, pool, **options):
    """The Trainer of a new model or of --resume's, from train's options."""
    if task == "classify":
        return open_classifier(ctx, corpus, db_path, prefix, iters, resume, overwrite,
                               init_from, lora_rank, lora_alpha, lora_targets, lora_dropout,
                               chat, sql, from_db, pool, options)
    if ctx.get_parameter_source("pool") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--pool goes with --task classify")
    corpus, chat = sql_corpus(corpus, sql, from_db, db_path, chat)
    if resume and overwrite:
        raise SqlgptError("--resume and --overwrite exclude each other")
    if chat_template and not chat and not resume:
        raise SqlgptError("--chat-template goes with --chat (the conversations it renders)")
    if resume and (chat or chat_template):
        raise SqlgptError("--resume continues on the conversations the fine-tune recorded: "
                          "give no --chat")
    given_sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.DEFAULT_MAP)
    explicit = [name for name in SETTING_FIELDS
                if ctx.get_parameter_source(name) in given_sources]
    given = {SETTING_FIELDS[name]: (f"--{name.replace('_', '-')}", options[name])
             for name in explicit}
    if resume and init_from:
        raise SqlgptError("--resume and --init-from exclude each other")
    lora_given = {f"lora_{name}": (f"--lora-{name}", value) for name, value in
                  (("rank", lora_rank), ("alpha", lora_alpha), ("targets", lora_targets),
                   ("dropout", lora_dropout))
                  if ctx.get_parameter_source(f"lora_{name}") in given_sources}
    if lora_given and lora_rank is None and not resume:
        raise SqlgptError(f"{', '.join(o for o, _ in lora_given.values())} needs --lora-rank "
                          f"(or the finetune command)")
    if resume:
        given.update(lora_given)
    lora = LoraConfig(lora_rank, lora_alpha, lora_targets, lora_dropout) \
        if lora_rank is not None and not resume else None
    if options["val_file"] is not None and "val_fraction" in explicit:
        raise click.UsageError("--val-file and --val-fraction exclude each other")
    run_options = {name: options[name] for name in RUN_OPTIONS
                   if ctx.get_parameter_source(name) in given_sources}
    if resume:
        return Trainer.resume(db_path, corpus, extensions, encoding_errors, corpus_progress(),
                              given, run_options, iters, prefix)
    else:
        if not corpus and chat is None:
            raise SqlgptError("name the corpus: one or more files, a directory, or - for stdin")
        arch = preset(options["preset"], **{field: options[name] for name, field in
                                            ARCH_OPTIONS.items() if name in explicit})
        tokenizer = options["tokenizer"] or PRESET_TOKENIZER[arch.preset]
        vocab_size = options["vocab_size"]
        cfg = TrainConfig(**train_settings(options, iters), tokenizer=tokenizer, max_iters=iters,
                          vocab_size=DEFAULT_VOCAB[tokenizer] if vocab_size is None
                          else vocab_size)
        return Trainer.create(db_path, corpus, arch, cfg, overwrite, extensions,
                              encoding_errors, corpus_progress(), init_from, given, prefix, lora,
                              chat, read_template(chat_template))


def train_settings(options, iters):
    """TrainConfig's fields from train's options, with what a resumed run
    must not change fixed now: the decay's length and end."""
    settings = {field: options[name] for name, field in TRAIN_OPTIONS.items()}
    settings["lr_decay_iters"] = settings["lr_decay_iters"] or iters
    if settings["min_lr"] is None:
        settings["min_lr"] = settings["lr"] / 10
    settings["val_file"] = settings["val_file"] or ""
    if settings["dropout_final"] is None:
        settings["dropout_final"] = -1.0
    settings["checkpoint_activations"] = options["checkpoint_activations"]
    settings["keep"] = options["keep"]
    return settings


def open_classifier(ctx, corpus, db_path, prefix, iters, resume, overwrite, init_from,
                    lora_rank, lora_alpha, lora_targets, lora_dropout, chat, sql, from_db, pool,
                    options):
    """finetune --task classify's Trainer: a new classifier of --base."""
    from ..classify.trainer import ClassifierTrainer
    from ..store import labelled_sql_source
    if resume:
        raise SqlgptError("a classifier cannot --resume yet: fine-tune it again into a new --db")
    if chat is not None:
        raise click.UsageError("--chat and --task classify exclude each other")
    if sql is not None:
        if corpus:
            raise click.UsageError("--sql is the labelled rows: name no file too")
        source = labelled_sql_source(sql, from_db or db_path)
    elif from_db is not None:
        raise click.UsageError("--from goes with --sql")
    elif len(corpus) != 1:
        raise SqlgptError("--task classify reads one .csv or .jsonl file of labelled texts "
                          "(or --sql rows)")
    else:
        source = corpus[0]
    lora = LoraConfig(lora_rank, lora_alpha, lora_targets, lora_dropout) \
        if lora_rank is not None else None
    if options["val_file"] is not None:
        raise click.UsageError("a classifier holds out --val-fraction of its rows: no --val-file")
    # the base's tokenizer replaces this placeholder
    cfg = TrainConfig(**train_settings(options, iters), max_iters=iters, tokenizer="char",
                      vocab_size=0)
    return ClassifierTrainer.create_classifier(db_path, source, init_from, cfg, pool, lora,
                                               overwrite, prefix)


def read_template(path):
    """--chat-template's text, or None."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_TEMPLATE_CHARS + 1)  # longer: refused by name when compiled
    except (OSError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read the chat template {path}: "
                          f"{getattr(e, 'strerror', None) or e}") from None


def report_training(trainer, result, db_path, as_json):
    """The run's last lines: how it stopped, where it saved."""
    if result.stopped_by == "divergence":
        raise SqlgptError(f"stopped at step {result.diverged_at}: the loss diverged "
                          f"(--stop-on-divergence); the last checkpoint, step "
                          f"{trainer.saved_step}, is kept: try a lower --lr")
    summary = {"step": result.step, "final_loss": result.final_loss,
               "tokens_per_sec": round(result.tokens_per_sec, 1),
               "steps_run": len(result.losses),
               "bad_steps": result.bad_steps, "db": db_path}
    if result.stopped_by:
        click.echo(f"stopped by {result.stopped_by}; checkpoint saved at step {result.step}",
                   err=True)
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"step {result.step}: last step's loss {result.final_loss:.4f}, "
                   f"{result.tokens_per_sec:,.0f} tokens/s, saved to {db_path}")


OVERFIT_RATIO = 1.5  # validation loss this many times the training loss: memorizing


def overfitting(train_loss, val_loss):
    """Whether a checkpoint's losses say the model is memorizing its training
    text (both known and finite, validation far above training)."""
    known = train_loss is not None and val_loss is not None and \
        math.isfinite(train_loss) and math.isfinite(val_loss)
    return known and val_loss > OVERFIT_RATIO * train_loss and val_loss - train_loss > 0.5


def finetune_command():
    """`finetune`: train's options, LoRA on by default (rank 8) over --base."""
    params = []
    for param in train.params:
        if param.name == "lora_rank":
            param = copy.copy(param)
            param.default, param.show_default = LORA_DEFAULTS.rank, True
            param.help = "The adapters' rank (0 is refused; train --base fine-tunes every weight)."
        params.append(param)
    return click.Command("finetune", params=params, callback=train.callback, help="""
    Fine-tune the --base model on CORPUS with LoRA adapters, into --db: only
    the adapters train (and carry optimizer state); the base is only read,
    and --db names it by path and by a hash of its weights. --resume
    continues a fine-tune; generate, eval, sql and sqlgpt.load() read --db
    directly; merge writes a plain model.

    Example: sqlgpt finetune --base base.db corpus.txt --db tuned.db --lora-rank 8
    """)



def corpus_progress():
    """A progress bar per pass over the corpus on a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None
    bars = {}

    def on_progress(stage, done, total):
        if stage not in bars:
            for bar in bars.values():
                bar.render_finish()
            bars[stage] = click.progressbar(length=max(total, 1), label=stage, file=sys.stderr)
            bars[stage].render_progress()
        bar = bars[stage]
        bar.update(done - bar.pos)
        if done >= total:
            bar.render_finish()
    return on_progress


def run_with_progress(trainer, iters, save_every, max_bad_steps, stop_on_divergence=False,
                      quiet=False):
    """A progress bar on a terminal; elsewhere (logs) one line per checkpoint;
    quiet: nothing (an MPI rank but the first)."""
    start = trainer.state["step"]
    if quiet:
        return trainer.run(iters, save_every, max_bad_steps,
                           stop_on_divergence=stop_on_divergence)

    def on_diverge(step, recent, first):
        if stop_on_divergence:
            return  # the run stops with its own message
        click.echo(f"{chr(10) if sys.stderr.isatty() else ''}warning: the loss is diverging: {recent:.4g} over the last steps at "
                   f"step {step}, from {first:.4f} at the start (try a lower --lr; "
                   f"--stop-on-divergence stops here)",
                   err=True)
    run = functools.partial(trainer.run, iters, save_every, max_bad_steps,
                            on_diverge=on_diverge, stop_on_divergence=stop_on_divergence)
    warned = []

    def warn_overfitting(train_loss, val_loss):
        if not warned and overfitting(train_loss, val_loss):
            warned.append(True)
            click.echo(f"{chr(10) if sys.stderr.isatty() else ''}warning: the validation loss "
                       f"{val_loss:.4f} is far above the training loss {train_loss:.4f}: the "
                       f"model is memorizing its training text (more text, fewer steps or more "
                       f"--dropout help)", err=True)

    if not sys.stderr.isatty():
        def on_checkpoint(step, train_loss, val_loss):
            click.echo(f"step {step}: train loss {fmt_loss(train_loss)} (mean since the last "
                       f"checkpoint), val loss {fmt_loss(val_loss)}", err=True)
            warn_overfitting(train_loss, val_loss)
        return run(on_checkpoint=on_checkpoint)
    shown = {"text": "", "val": None}
    with click.progressbar(length=max(0, iters - start), label="training", file=sys.stderr,
                           item_show_func=lambda _: shown["text"], show_eta=True) as bar:
        def on_step(report):
            latest = trainer.latest_val()
            val = f" val {latest:.4f}" if latest is not None else ""
            shown["text"] = (f"step {report.step} loss {report.loss:.4f}{val} "
                             f"{report.tokens_per_sec:,.0f} tok/s")
            bar.update(1)
        return run(on_step=on_step, on_checkpoint=lambda step, train, val:
                   warn_overfitting(train, val))



@click.command()
@db_option
@output_option("The plain model file to write.")
@fail_cleanly
def merge(db_path, prefix, out_path):
    """Fold the LoRA adapters of the fine-tune --db into its base's weights
    (W + alpha/rank A B) and write them as a plain model: it generates and
    evaluates without the base, and --init-from trains on from it.

    Example: sqlgpt merge --db tuned.db -o merged.db
    """
    from ..api import merge as merge_model
    merge_model(db_path, out_path, prefix)
    click.echo(f"wrote {out_path}")


COMMANDS = (train, finetune_command(), merge)
