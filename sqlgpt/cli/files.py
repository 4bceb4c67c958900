"""The model file's commands: info, check, compact, quantize, export and
import."""
import os

import click

from .. import store
from ..api import load
from ..errors import SqlgptError
from ..model.profile import model_profile
from ..model.quant import DEFAULT_GROUP
from .common import db_option, emit_json, fail_cleanly, fmt_loss, output_option

SHOWN_FILES = 10  # corpus files info lists one a line (--json: all)


@click.command()
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
            scores = store.read_classifier_evals(conn) if model.labels else []
            stored = store.stored_parameters(conn, model.arch)
    finally:
        conn.close()
    profile = model_profile(model.arch, model.train_config.batch_size,
                            model.train_config.checkpoint_activations)
    lora = model.lora.to_dict() if model.lora else None
    report = {"db": db_path, "config": model.config, "parameters": model.num_parameters(),
              "step": model.step, "corpus": model.corpus, "profile": profile,
              "checkpoints": history, "kept_steps": kept, "lora": lora, "quantized": quantized,
              "labels": model.labels, "classifier_evals": scores, "stored": stored}
    if as_json:
        emit_json(report)
        return
    click.echo(f"{db_path}: step {model.step}, {model.num_parameters():,} parameters")
    if set(stored) != {"f32"}:  # an import kept in the precision it came in
        click.echo("stored as: " + ", ".join(f"{fmt} {count:,}" for fmt, count in stored.items()))
    corpus = model.corpus
    if corpus.get("sha256"):
        files = corpus.get("files") or []
        tokens = f", {corpus['tokens']:,} tokens" if corpus.get("tokens") else ""
        kind = ("query", "queries") if files and all("sql" in f for f in files) else \
            ("file", "files")
        click.echo(f"corpus: {len(files) or 'files not recorded'}"
                   f"{' ' + kind[0] if len(files) == 1 else ' ' + kind[1] if files else ''}"
                   f"{tokens}, "
                   f"sha256 {corpus['sha256']}")
        for f in files[:SHOWN_FILES]:
            click.echo(f"  --sql {f['sql']!r} on {f['from']} ({f['rows']:,} rows)" if "sql" in f
                       else f"  {f['path']} ({f['bytes']:,} bytes)")
        if len(files) > SHOWN_FILES:
            click.echo(f"  ... and {len(files) - SHOWN_FILES:,} more (sqlgpt info --json lists "
                       f"them all)")
    if lora:
        click.echo(f"LoRA fine-tune of {lora['base']} (weights sha256 {lora['base_sha256'][:16]}"
                   f"...): rank {lora['rank']}, alpha {lora['alpha']:g}, targets "
                   f"{lora['targets']}, dropout {lora['dropout']:g}")
    if model.labels:
        click.echo(f"classifier: {len(model.labels)} labels ({', '.join(model.labels[:8])}"
                   f"{', ...' if len(model.labels) > 8 else ''}), pool {model.arch.pool}")
        if scores:
            last = scores[-1]
            click.echo(f"  held out at step {last['step']}: accuracy {last['accuracy']:.1%}, "
                       f"macro-F1 {last['macro_f1']:.3f} on {last['examples']:,} rows")
    for name, q in quantized.items():
        click.echo(f"{name} copy: group size {q['group_size']}, from step {q['step']}"
                   + ("" if q["step"] == model.step else " (stale: quantize again)"))
    # sizes stored as 0 mean "the default": show what that default is
    derived = {"ffn_dim": f"MLP hidden size {model.arch.hidden_dim}",
               "kv_heads": f"{model.arch.n_kv_heads} key/value heads",
               "head_size": f"{model.arch.num_heads} heads of {model.arch.head_dim}"}
    for title, settings in (("architecture", model.arch), ("training", model.train_config)):
        click.echo(f"{title}:")
        for name, value in settings.to_dict().items():
            note = f" ({derived[name]})" if title == "architecture" and name in derived else ""
            click.echo(f"  {name:<14} {value}{note}")
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



@click.command()
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
    model.read_weights()
    click.echo(f"{db_path}: ok (integrity_check ok, {model.num_parameters():,} parameters "
               f"checksummed, step {model.step})")



@click.command()
@db_option
@output_option("The new, compacted database file.")
@fail_cleanly
def compact(db_path, prefix, out_path):
    """Copy --db without Adam's moments and kept checkpoints (the history
    rows stay): about a third of the size; it generates and evaluates, and
    --init-from fine-tunes from it (it cannot resume).

    Example: sqlgpt compact --db model.db -o small.db
    """
    store.compact(db_path, out_path, prefix)
    before, after = os.path.getsize(db_path), os.path.getsize(out_path)
    whole = " the whole of" if prefix else ""  # an app's file holds the app's tables too
    click.echo(f"wrote {out_path}: {after:,} bytes ({after / before:.0%} of{whole} "
               f"{db_path}'s {before:,})")


@click.command()
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
    if sizes is None:
        click.echo(f"{db_path} already has int{bits} weights (group size {group_size}) of its "
                   f"latest checkpoint: nothing to do")
        return
    click.echo(f"wrote int{bits} weights (group size {group_size}) to {db_path}: "
               f"{sizes['bytes']:,} bytes for {sizes['fp32_bytes']:,} of float32")


@click.command(name="export")
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


@click.command(name="import")
@click.argument("source", type=click.Path())
@db_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --db.")
@fail_cleanly
def import_(source, db_path, prefix, overwrite):
    """Make a sqlgpt database from a local model: a transformers directory
    (gpt2, llama, qwen2 or mistral: config.json, safetensors weights,
    tokenizer.json) or a llama.cpp GGUF file (llama, qwen2 or gpt2; F32,
    F16, BF16, Q8_0 or Q4_0). Nothing is downloaded.

    Examples: sqlgpt import model-hf --db model.db;
    sqlgpt import model.Q8_0.gguf --db model.db
    """
    from ..api import import_gguf, import_hf
    if os.path.isdir(source):
        model = import_hf(source, db_path, overwrite, prefix)
    elif os.path.isfile(source):
        model = import_gguf(source, db_path, overwrite, prefix)
    else:
        raise SqlgptError(f"{source} is not a directory (a transformers model) or a GGUF file")
    click.echo(f"wrote {db_path}: {model.arch.preset} preset, {model.num_parameters():,} "
               f"parameters")


COMMANDS = (info, check, compact, quantize, export_, import_)
