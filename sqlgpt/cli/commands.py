"""The `sqlgpt` command: parses options, shows progress, calls the library."""
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time

import click

from .. import set_threads
from ..train import distributed
from .. import store
from ..api import load
from ..model.arch import MLPS, NORMS, POSITIONS, PRESETS, ArchConfig, preset
from ..model.config import OPTIMIZERS, SCHEDULES, TOKENIZER_KINDS, TrainConfig, read_run_file
from ..data.corpus import ENCODING_ERRORS, find_sources, fingerprint
from ..errors import AlreadyTrained, SqlgptError
from ..inference.generate import DRAFT_TOKENS, MAX_BATCH, PRECISIONS, GenerationStats, Sampler
from ..model.lora import LoraConfig
from ..model.profile import model_profile
from ..model.quant import DEFAULT_GROUP
from ..train.trainer import Trainer

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
    "seq_len": "seq_len", "kv_heads": "kv_heads", "norm": "norm",
    "norm_affine": "norm_affine", "norm_eps": "norm_eps", "pos": "pos",
    "rope_theta": "rope_theta", "mlp": "mlp", "ffn_dim": "ffn_dim", "bias": "bias",
    "tie_weights": "tie_weights", "final_norm": "final_norm",
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
                        help="Weights while decoding: bf16 streams half the bytes of fp32 per "
                             "token, int8 and int4 a quarter and an eighth (from sqlgpt "
                             "quantize's copies; integer dot products).")(fn)


def output_option(help_text):
    return click.option("-o", "--output", "out_path", required=True, type=click.Path(),
                        help=help_text)


step_option = click.option(
    "--step", type=click.IntRange(min=0), default=None,
    help="Use the checkpoint of this step (one train --keep kept). [default: the latest]")

threads_option = click.option(
    "--threads", type=click.IntRange(1, 4096), default=None, expose_value=False,
    callback=apply_threads, help="Threads for the kernel. [default: every core]")


@click.group(cls=OneLineErrors)
@click.version_option(package_name="sqlgpt")
def main():
    """Train and run small GPT language models on a CPU, stored in one SQLite file."""


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


@main.command()
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
              help="Attention heads (must divide --embed-dim).")
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
                 **options):
    """The Trainer of a new model or of --resume's, from train's options."""
    if resume and overwrite:
        raise SqlgptError("--resume and --overwrite exclude each other")
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
        if not corpus:
            raise SqlgptError("name the corpus: one or more files, a directory, or - for stdin")
        arch = preset(options["preset"], **{field: options[name] for name, field in
                                            ARCH_OPTIONS.items() if name in explicit})
        tokenizer = options["tokenizer"] or PRESET_TOKENIZER[arch.preset]
        settings = {field: options[name] for name, field in TRAIN_OPTIONS.items()}
        # what a resumed run must not change is fixed now: the decay's length and end
        settings["lr_decay_iters"] = settings["lr_decay_iters"] or iters
        if settings["min_lr"] is None:
            settings["min_lr"] = settings["lr"] / 10
        settings["val_file"] = settings["val_file"] or ""
        if settings["dropout_final"] is None:
            settings["dropout_final"] = -1.0
        settings["checkpoint_activations"] = options["checkpoint_activations"]
        settings["keep"] = options["keep"]
        vocab_size = options["vocab_size"]
        cfg = TrainConfig(**settings, tokenizer=tokenizer, max_iters=iters,
                          vocab_size=DEFAULT_VOCAB[tokenizer] if vocab_size is None
                          else vocab_size)
        return Trainer.create(db_path, corpus, arch, cfg, overwrite, extensions,
                              encoding_errors, corpus_progress(), init_from, given, prefix, lora)


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
        click.echo(f"step {result.step}: loss {result.final_loss:.4f}, "
                   f"{result.tokens_per_sec:,.0f} tokens/s, saved to {db_path}")


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


main.add_command(finetune_command())


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
    if not sys.stderr.isatty():
        def on_checkpoint(step, train_loss, val_loss):
            click.echo(f"step {step}: train loss {fmt_loss(train_loss)}, "
                       f"val loss {fmt_loss(val_loss)}", err=True)
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
        return run(on_step=on_step)


def shown_piece(piece):
    """A token's piece on one line: line breaks and tabs as escapes (a piece
    that is not UTF-8 already reads \\xNN)."""
    return piece.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def fmt_loss(value):
    return "-" if value is None else f"{value:.4f}"


@main.command()
@db_option
@click.option("--prompt", default="", help="Text to continue (empty: a new document, after <eos>; with the word "
                   "tokenizer, from the commonest word).")
@click.option("--max-tokens", type=click.IntRange(min=0), default=50, show_default=True,
              help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0 = all).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
              show_default=True, help="Nucleus sampling: smallest set with this probability.")
@click.option("--min-p", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
              help="Keep tokens at least this fraction as likely as the most likely one.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="Above 1, tokens already in the context become less likely.")
@click.option("--stop", multiple=True,
              help="End the text before this string (repeatable); <eos> and --max-tokens "
                   "end it too.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Seed for reproducible samples (sample i of a batch uses seed + i).")
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
@step_option
@threads_option
@fail_cleanly
def generate(db_path, prefix, prompt, max_tokens, temperature, top_k, top_p, min_p,
             repetition_penalty, stop, seed, allow_unk, precision, num_samples, prompts_file,
             stream, as_json, interactive, draft_db, draft_prefix, draft_tokens, step):
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
    model = load(db_path, precision, step, prefix)
    options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, allow_unk=allow_unk, stop=stop, min_p=min_p,
                   repetition_penalty=repetition_penalty)
    if draft_db:
        # a draft reads float weights (bf16 beside an integer model: it has no copies of its own)
        draft = load(draft_db, precision if precision in ("fp32", "bf16") else "bf16",
                     prefix=draft_prefix)
        model.check_draft(draft)
        options.update(draft=draft, draft_tokens=draft_tokens)
    Sampler(temperature, top_k, top_p, min_p, repetition_penalty)  # bad settings: one line
    if interactive:
        return interactive_loop(model, options)
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
    shown = sys.stdout.isatty() if stream is None else stream
    start, pieces, stats = time.perf_counter(), [], GenerationStats()
    for piece in model.stream(prompt, stats=stats, **options):
        pieces.append(piece)
        if shown and not as_json:
            click.echo(piece, nl=False)
    seconds = time.perf_counter() - start
    text = "".join(pieces)
    if as_json:
        emit_json({"prompt": prompt, "text": text, "tokens": stats.tokens,
                   "tokens_per_s": round(stats.tokens / seconds, 1) if seconds else 0.0})
    else:
        click.echo("" if shown else text)
    if draft_db:
        click.echo(f"draft: {stats.accepted} of {stats.proposed} proposed tokens accepted "
                   f"({stats.acceptance:.0%}), {stats.steps} target steps", err=True)


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
    import importlib
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass
    click.echo("sqlgpt: type a prompt and press Enter; Ctrl-C stops an answer, Ctrl-D quits.",
               err=True)
    while True:
        try:
            prompt = input("> ")
        except KeyboardInterrupt:
            click.echo()
            continue
        except EOFError:
            click.echo()
            return
        if not prompt.strip():
            continue
        note_long_prompt(model, prompt)
        try:
            for piece in model.stream(prompt, **options):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        except SqlgptError as e:
            click.echo(f"error: {e}", err=True)
        click.echo()


@main.command(name="eval")
@click.argument("corpus", nargs=-1, required=True, type=click.Path())
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@precision_option
@step_option
@threads_option
@fail_cleanly
def eval_(corpus, db_path, prefix, stride, batch_size, extensions, encoding_errors, as_json,
          precision, step):
    """Score the model in --db on CORPUS (files, directories or -): mean
    cross-entropy per token, perplexity and next-token accuracy; with
    --precision, of the weights in that format, as generation reads them.

    Example: sqlgpt eval --db model.db held_out.txt --json
    """
    model = load(db_path, precision, step, prefix)
    result = model.evaluate(paths=corpus, stride=stride, batch_size=batch_size,
                            extensions=extensions, encoding_errors=encoding_errors)
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
               f"accuracy {result.accuracy:.1%}, {result.tokens:,} tokens")


@main.command()
@db_option
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def tokenize(db_path, prefix, text, as_json):
    """Show how the model in --db splits TEXT: each token's id and piece.

    Example: sqlgpt tokenize --db model.db "The king's crown"
    """
    model = load(db_path, prefix=prefix)
    ids = [int(i) for i in model.encode(text)]
    pieces = model.tokenizer.pieces(ids)
    if as_json:
        emit_json({"ids": ids, "pieces": pieces, "tokens": len(ids)})
        return
    for token, piece in zip(ids, pieces):
        click.echo(f"{token:>7}  '{shown_piece(piece)}'")
    click.echo(f"{len(ids)} tokens")


@main.command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def info(db_path, prefix, as_json):
    """Show a model's config, parameter count and checkpoints.

    Example: sqlgpt info --db model.db
    """
    model = load(db_path, prefix=prefix)
    conn = store.open_database(db_path, readonly=True, prefix=prefix)
    try:
        with store.sqlite_errors(f"cannot read {db_path}"):
            history = store.checkpoints(conn)
            kept = store.kept_steps(conn)
            quantized = {f"int{bits}": {"group_size": group, "step": step}
                         for bits, (group, step) in store.quantized_sets(conn).items()}
    finally:
        conn.close()
    profile = model_profile(model.arch, model.train_config.batch_size,
                            model.train_config.checkpoint_activations)
    lora = model.lora.to_dict() if model.lora else None
    report = {"db": db_path, "config": model.config, "parameters": model.num_parameters(),
              "step": model.step, "corpus": model.corpus, "profile": profile,
              "checkpoints": history, "kept_steps": kept, "lora": lora, "quantized": quantized}
    if as_json:
        emit_json(report)
        return
    click.echo(f"{db_path}: step {model.step}, {model.num_parameters():,} parameters")
    corpus = model.corpus
    if corpus.get("sha256"):
        files = ", ".join(f"{f['path']} ({f['bytes']:,} bytes)" for f in corpus["files"]) or \
            "(files not recorded)"
        tokens = f", {corpus['tokens']:,} tokens" if corpus.get("tokens") else ""
        click.echo(f"corpus: {files}{tokens}, sha256 {corpus['sha256']}")
    if lora:
        click.echo(f"LoRA fine-tune of {lora['base']} (weights sha256 {lora['base_sha256'][:16]}"
                   f"...): rank {lora['rank']}, alpha {lora['alpha']:g}, targets "
                   f"{lora['targets']}, dropout {lora['dropout']:g}")
    for name, q in quantized.items():
        click.echo(f"{name} copy: group size {q['group_size']}, from step {q['step']}"
                   + ("" if q["step"] == model.step else " (stale: quantize again)"))
    for title, settings in (("architecture", model.arch), ("training", model.train_config)):
        click.echo(f"{title}:")
        for name, value in settings.to_dict().items():
            click.echo(f"  {name:<14} {value}")
    click.echo("parameters: " + ", ".join(f"{group} {count:,}" for group, count
                                          in profile["parameters"].items()))
    flops = profile["flops_per_token"]
    click.echo(f"FLOPs per token: forward {flops['forward'] / 1e6:.2f} M, training "
               f"{flops['training'] / 1e6:.2f} M")
    click.echo(f"memory to train at batch {model.train_config.batch_size} x seq "
               f"{model.arch.seq_len} (MB): " + ", ".join(
                   f"{part} {size:,.1f}" for part, size in profile["memory_mb"].items()))
    if kept:
        click.echo(f"kept checkpoints (--step): {', '.join(map(str, kept))}")
    click.echo(f"checkpoints ({len(history)}):")
    for c in history[-10:]:
        click.echo(f"  step {c['step']:>6}  train loss {fmt_loss(c['train_loss']):>7}  "
                   f"val loss {fmt_loss(c['val_loss']):>7}  "
                   f"{c['created_at']}")


@main.command("extension-path")
@fail_cleanly
def extension_path_command():
    """Print where the loadable SQLite extension is, for `.load` in the
    sqlite3 shell or load_extension() in any SQLite client.

    Example: sqlite3 model.db ".load $(sqlgpt extension-path)" "SELECT sqlgpt_generate('the', 20)"
    """
    from ..sql.functions import extension_path
    click.echo(extension_path())


@main.command()
@db_option
@fail_cleanly
def check(db_path, prefix):
    """Verify a database: SQLite's integrity_check (the file's structure), then
    every weight row's checksum, shape and values, the config and vocabulary.

    Example: sqlgpt check --db model.db
    """
    problems = store.integrity_check(db_path, prefix)
    if problems:
        raise SqlgptError(f"{db_path} is damaged: " + "; ".join(problems[:3]))
    model = load(db_path, prefix=prefix)
    click.echo(f"{db_path}: ok (integrity_check ok, {model.num_parameters():,} parameters "
               f"checksummed, step {model.step})")


@main.command(name="datasette-metadata")
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


@main.command()
@db_option
@output_option("The new, compacted database file.")
@fail_cleanly
def compact(db_path, prefix, out_path):
    """Copy --db without Adam's moments and kept checkpoints (the history
    rows stay): about a third of the size; it generates and evaluates, and
    --init-from fine-tunes from it (it cannot resume).

    Example: sqlgpt compact --db model.db -o small.db
    """
    import os
    store.compact(db_path, out_path, prefix)
    before, after = os.path.getsize(db_path), os.path.getsize(out_path)
    whole = " the whole of" if prefix else ""  # an app's file holds the app's tables too
    click.echo(f"wrote {out_path}: {after:,} bytes ({after / before:.0%} of{whole} "
               f"{db_path}'s {before:,})")


@main.command()
@db_option
@click.option("--bits", type=click.Choice(["8", "4"]), required=True,
              help="8: int8 groups (Q8_0); 4: int4 groups (Q4_0).")
@click.option("--group-size", type=int, default=DEFAULT_GROUP, show_default=True,
              help="Values per scale, along each matrix's input (32 or 64).")
@fail_cleanly
def quantize(db_path, prefix, bits, group_size):
    """Store int8 or int4 copies of the matrices of --db's latest checkpoint
    beside its float32 weights, for generate, eval and sql with --precision
    int8 / int4 (norms, biases and embeddings stay float32).

    Example: sqlgpt quantize --db model.db --bits 8
    """
    from ..api import quantize as quantize_model
    sizes = quantize_model(db_path, int(bits), group_size, prefix)
    click.echo(f"wrote int{bits} weights (group size {group_size}) to {db_path}: "
               f"{sizes['bytes']:,} bytes for {sizes['fp32_bytes']:,} of float32")


@main.command(name="export")
@db_option
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf", "peft"]), default="hf",
              show_default=True,
              help="hf: a transformers directory (GPT2LMHeadModel or LlamaForCausalLM); gguf: "
                   "a llama.cpp file (needs the gguf package); peft: a LoRA fine-tune's "
                   "adapters, for the hf export of its base.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32",
              show_default=True, help="GGUF only: the matrices' format (vectors stay f32).")
@output_option("The directory (hf: new, or empty) or file (gguf) to write.")
@fail_cleanly
def export_(db_path, prefix, fmt, dtype, out_path):
    """Write the model in --db for other tools: a transformers directory
    (config.json, model.safetensors, generation_config.json, tokenizer.json
    for byte-level BPE), or a GGUF file for llama.cpp.

    Example: sqlgpt export --db model.db --format hf -o model-hf
    """
    from ..api import export
    if fmt != "gguf" and dtype != "f32":
        raise SqlgptError("--dtype is for --format gguf (hf exports float32)")
    written = export(db_path, out_path, fmt, prefix, dtype)
    click.echo(f"wrote {out_path}: " + (f"{written} tensors, {dtype}" if fmt == "gguf" else
                                        ", ".join(written)))


@main.command(name="import")
@click.argument("directory", type=click.Path())
@db_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --db.")
@fail_cleanly
def import_(directory, db_path, prefix, overwrite):
    """Make a sqlgpt database from a local transformers GPT-2 or llama
    DIRECTORY (config.json, model.safetensors, tokenizer.json as sqlgpt
    export writes it); nothing is downloaded.

    Example: sqlgpt import model-hf --db model.db
    """
    from ..api import import_hf
    model = import_hf(directory, db_path, overwrite, prefix)
    click.echo(f"wrote {db_path}: {model.arch.preset} preset, {model.num_parameters():,} "
               f"parameters")


@main.command()
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


@main.command()
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


@main.command()
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


@main.command()
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


if __name__ == "__main__":
    main()
