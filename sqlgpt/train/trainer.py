"""Training: corpus -> token ids (once, in a file) -> random windows -> steps -> checkpoints.

Every source of randomness (weight init, batch positions, dropout seeds) comes
from one numpy PCG64 generator whose state is saved with each checkpoint, so a
resumed run continues exactly as an uninterrupted one would.
"""
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import store
from .._kernel import lib
from ..model.arch import ArchConfig
from ..model.config import TrainConfig
from ..data.corpus import find_sources, fingerprint, remove_spools
from .distributed import SIGNAL_CODES, Agreed, World, batch_too_small
from ..data.dataset import (TOKENS_SUFFIX, VAL_TOKENS_SUFFIX, build_tokenizer, open_tokens,
                      split_tokens, tokens_path, write_tokens)
from ..errors import AlreadyTrained, SqlgptError
from .evaluate import evaluate
from ..model.lora import LoraConfig, base_digest, base_reference, merged
from ..model.model import GPT
from ..model.tensor import aligned_zeros, fptr

METRICS_FLUSH_S = 2.0   # write metrics rows at most this often
MICRO_SEED_STRIDE = 0xD1B54A32D192ED03  # an odd constant: micro-batch seeds far apart
# a run diverges when its loss, averaged over this many steps, passes this
# multiple of its first step's (a fresh model starts near ln(vocabulary))
DIVERGE_WINDOW = 10
DIVERGE_FACTOR = 3.0
EXIT_SIGNALS = ("SIGINT", "SIGTERM")


def random_batch(tokens, rng, B, T):
    """B random windows of T tokens and their next-token targets, each (B,T)."""
    starts = rng.integers(0, len(tokens) - T, size=B)
    index = starts[:, None] + np.arange(T)
    return tokens[index], tokens[index + 1]


@dataclass
class StepReport:
    step: int
    loss: float
    lr: float
    tokens_per_sec: float
    skipped: bool = False


@dataclass
class RunResult:
    step: int
    final_loss: float
    tokens_per_sec: float
    stopped_by: str = ""      # "", "SIGINT", "SIGTERM" or "divergence"
    bad_steps: int = 0
    losses: list = field(default_factory=list)
    diverged_at: int = 0      # the step where the loss was first found diverging (0: never)


def _progress(on_progress, stage, sources):
    """on_bytes(n) for one pass over the sources, reporting to on_progress."""
    if not on_progress:
        return None
    total, done = sum(source.size for source in sources), [0]

    def on_bytes(n):
        done[0] += n
        on_progress(stage, done[0], total)
    on_progress(stage, 0, total)
    return on_bytes


def _check_unchanged(settings, stored, arch, keeper="--resume keeps the stored config"):
    """Refuse, naming them, the settings a run asks to change from stored ones.
    kv_heads and ffn_dim compare by what they mean (0: the default) in arch."""
    def same(field, value):
        if field == "val_file":
            return Path(value).resolve() == Path(stored[field]).resolve()
        if field in ("kv_heads", "ffn_dim"):
            other = replace(arch, **{field: value})
            return (other.n_kv_heads, other.hidden_dim) == (arch.n_kv_heads, arch.hidden_dim)
        return stored.get(field) == value
    changed = [f"{option} {value} (stored: {stored.get(field, 'none')})"
               for field, (option, value) in settings.items() if not same(field, value)]
    if changed:
        raise SqlgptError(f"{keeper}; these differ from it: " + ", ".join(changed))


# train_state key and file suffix of each token file: the corpus, --val-file's text
TOKEN_FILES = {"corpus": ("tokens", TOKENS_SUFFIX), "val": ("val_tokens", VAL_TOKENS_SUFFIX)}


def _write_token_file(db_path, prefix, which, sources, tokenizer, errors, on_progress,
                      recorded=None):
    """Tokenize sources into the token file `which` beside the database
    (through a temporary file, so a failure leaves none); its description.
    recorded: the description the database holds, which the ids must match."""
    key, suffix = TOKEN_FILES[which]
    path = tokens_path(db_path, suffix, prefix)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        written = write_tokens(sources, tokenizer, tmp, errors,
                               _progress(on_progress, "tokenizing", sources))
        written["file"] = path.name
        if recorded and written["sha256"] != recorded["sha256"]:
            raise SqlgptError(f"the {'corpus' if which == 'corpus' else 'validation text'} "
                              f"tokenizes to other ids than {db_path} recorded; refusing to "
                              f"resume on other data")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _resume_tokens(db_path, prefix, state, which, tokenizer, sources, errors, on_progress):
    """The recorded token file; or, when it is gone or the database predates
    token files, the given text tokenized again into it (to the recorded
    ids). Without the text a missing file is a one-line error."""
    key, suffix = TOKEN_FILES[which]
    info = state.get(key)
    if info and (tokens_path(db_path, suffix, prefix).is_file() or not sources):
        return open_tokens(db_path, info)
    if not sources and which == "val":
        raise SqlgptError(f"the validation tokens of {db_path} "
                          f"({tokens_path(db_path, suffix, prefix)}) and the --val-file they "
                          f"came from are both missing")
    if not sources:
        raise SqlgptError(f"{db_path} was trained before token files existed: name its corpus "
                          f"to resume")
    state[key] = _write_token_file(db_path, prefix, which, sources, tokenizer, errors,
                                   on_progress, info)  # recorded with the next checkpoint
    return open_tokens(db_path, state[key], verify=False)


def _val_sources(val_file, spool_dir):
    """--val-file's one text (a file, not a directory or stdin)."""
    path = Path(val_file)
    if str(val_file) == "-" or path.is_dir():
        raise SqlgptError("--val-file names one text file")
    return find_sources([path], spool_dir=spool_dir)


def _val_split(val_tokens, seq_len, val_file):
    if len(val_tokens) < seq_len + 1:
        raise SqlgptError(f"--val-file {val_file} has {len(val_tokens)} tokens, too few for "
                          f"seq_len {seq_len} (need at least {seq_len + 1})")
    return val_tokens


def corpus_record(sources):
    """What train_state keeps of the corpus besides its SHA-256: each file's
    absolute path ("-" for standard input) and size in bytes."""
    return [{"path": source.name if source.name == "-" else str(Path(source.path).resolve()),
             "bytes": source.size} for source in sources]


def divergence(losses, start):
    """True when the mean of the last DIVERGE_WINDOW losses is more than
    DIVERGE_FACTOR times the run's first loss (or not finite)."""
    if len(losses) < DIVERGE_WINDOW:
        return False
    recent = float(np.mean(losses[-DIVERGE_WINDOW:]))
    return not math.isfinite(recent) or recent > DIVERGE_FACTOR * start


def resumable_rng(state):
    """The generator a training state saved, after checking the state's
    counters; a one-line error for a damaged one."""
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["rng"]
        ok = all(isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
                 for k in ("step", "bad_steps", "tokens_seen"))
        ok = ok and isinstance(state["elapsed_s"], (int, float))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise SqlgptError("the train_state table is damaged; cannot resume")
    return rng


class Trainer:
    """Owns the model, its training settings, its database connection and
    the training state."""

    def __init__(self, conn, lock, model, train_cfg, tokenizer, train_tokens, val_tokens, state):
        self.conn, self.lock, self.model, self.tokenizer = conn, lock, model, tokenizer
        self.cfg = train_cfg
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.state = state
        self.rng = resumable_rng(state)
        self.saved_step = state["step"]
        self._stop = ""
        self._last_val = None  # the latest evaluation's loss, with --eval-every
        self.world = World()  # the ranks training together (see spread)
        self._signalled = ""  # a signal this rank received, for the ranks to agree on
        self._shard = None    # ZeRO-1: this rank's span of the arenas, its m, v and gradient

    # ---- construction ----
    @classmethod
    def create(cls, db_path, corpus, arch, cfg, overwrite=False, extensions=(),
               encoding_errors="strict", on_progress=None, init_from=None, settings=None,
               prefix="", lora=None):
        """Build the tokenizer from the corpus (files, directories or "-"),
        tokenize the corpus once into the token file beside the database,
        and write a freshly initialized model of architecture arch (its
        n_vocab set from the tokenizer) as the step-0 checkpoint of a new
        database. on_progress(stage, bytes_done, bytes_total) reports the
        two passes over the corpus. init_from: a trained database whose
        architecture, tokenizer and weights the new model starts from (with a
        fresh optimizer state; the base file is only read); settings (as for
        resume) must then not change its architecture. prefix: the model goes
        into the (app's) database at db_path under prefixed table names.
        lora (a LoraConfig, with init_from as its base): a LoRA fine-tune,
        whose database holds only the adapters and names its base."""
        db_path = Path(db_path)
        store.check_new_location(db_path, overwrite, store.check_prefix(prefix))
        if lora is not None and not init_from:
            raise SqlgptError("a LoRA fine-tune needs the model it adapts: --base BASE.db")
        cfg.validate()
        arch.validate()
        sources = find_sources(corpus, extensions, spool_dir=db_path.parent)
        tmp_tokens = db_path.with_name(f".{db_path.name}.{os.getpid()}.{prefix}tokens.tmp")
        tmp_val = db_path.with_name(f".{db_path.name}.{os.getpid()}.{prefix}val.tokens.tmp")
        try:
            if cfg.val_file:  # held out whole: the corpus is all training text
                val_sources = _val_sources(cfg.val_file, db_path.parent)
                cfg.val_file, cfg.val_fraction = str(val_sources[0].path.resolve()), 0.0
            if init_from:
                if Path(init_from).resolve() == db_path.resolve():
                    raise SqlgptError("--init-from and --db name the same file; the base model "
                                      "is only read: name a new --db")
                with store.snapshot(init_from) as conn:
                    base, base_cfg, base_tokenizer, _, _ = store.read_checkpoint(conn, init_from)
                if lora is not None and base.lora is not None:
                    raise SqlgptError(f"the base {init_from} is itself a LoRA fine-tune: "
                                      f"sqlgpt merge it into a plain model first")
                kept = {**base.arch.to_dict(), "tokenizer": base_cfg.tokenizer,
                        "vocab_size": base_cfg.vocab_size}
                _check_unchanged({f: v for f, v in (settings or {}).items() if f in kept}, kept,
                                 base.arch, "--init-from keeps the base model's architecture and "
                                 "tokenizer")
                arch, tokenizer = replace(base.arch), base_tokenizer
                cfg.tokenizer = base_cfg.tokenizer
                cfg.vocab_size = base_cfg.vocab_size
            else:
                tokenizer = build_tokenizer(cfg.tokenizer, sources, cfg.vocab_size,
                                            encoding_errors,
                                            _progress(on_progress, "reading", sources))
                if cfg.tokenizer == "word":  # a small corpus may have fewer words
                    cfg.vocab_size = tokenizer.vocab_size
                arch.n_vocab = tokenizer.n_ids
            arch.validate()
            if lora is not None:  # before the corpus is read: a bad setting costs nothing
                lora.validate(arch)
                lora.base = base_reference(init_from, db_path)
            counts = np.zeros(tokenizer.n_ids, dtype=np.int64)
            info = write_tokens(sources, tokenizer, tmp_tokens, encoding_errors,
                                _progress(on_progress, "tokenizing", sources), counts)
            info["file"] = tokens_path(db_path, prefix=prefix).name
            tokens = np.memmap(tmp_tokens, dtype=np.dtype(info["dtype"]), mode="r")
            train, val = split_tokens(tokens, arch.seq_len, cfg.val_fraction)
            val_info = None
            if cfg.val_file:  # beside the corpus's: both move into place with the database
                val_info = write_tokens(val_sources, tokenizer, tmp_val, encoding_errors,
                                        _progress(on_progress, "tokenizing", val_sources))
                val_info["file"] = tokens_path(db_path, VAL_TOKENS_SUFFIX, prefix).name
                val = _val_split(np.memmap(tmp_val, dtype=np.dtype(val_info["dtype"]), mode="r"),
                                 arch.seq_len, cfg.val_file)
            model = GPT(arch, cfg.checkpoint_activations, lora)
            rng = np.random.default_rng(cfg.seed)
            model.init_weights(rng)  # a fine-tune's: its adapters (B = 0: the base exactly)
            if init_from:  # the base's weights; Adam's moments start at zero
                weights = merged(base)
                for t in model.base:
                    t.data[...] = weights[t.name]
                if lora is not None:
                    lora.base_sha256 = base_digest(model.base)
            state = {"step": 0, "rng": rng.bit_generator.state,
                     "corpus_sha256": fingerprint(sources), "tokens": info,
                     "corpus": corpus_record(sources),
                     "elapsed_s": 0.0, "bad_steps": 0, "tokens_seen": 0}
            if val_info:
                state["val_tokens"] = val_info
            # an old file being replaced must not be in use (a prefixed model
            # takes its lock on the app's file inside create_database)
            old_lock = store.WriterLock(db_path) if db_path.exists() and not prefix else None
            try:
                with store.sqlite_errors(f"cannot create {db_path}"):
                    conn, lock = store.create_database(db_path, model, cfg, tokenizer, state,
                                                       overwrite, counts, prefix)
                # the memmap follows the file
                os.replace(tmp_tokens, tokens_path(db_path, prefix=prefix))
                if val_info:
                    os.replace(tmp_val, tokens_path(db_path, VAL_TOKENS_SUFFIX, prefix))
            finally:
                if old_lock:
                    old_lock.release()
        finally:
            remove_spools(sources)
            for tmp in (tmp_tokens, tmp_val):
                tmp.unlink(missing_ok=True)
        return cls(conn, lock, model, cfg, tokenizer, train, val, state)

    @classmethod
    def resume(cls, db_path, corpus=(), extensions=(), encoding_errors="strict",
               on_progress=None, settings=None, run_options=None, max_iters=None, prefix=""):
        """Reopen a database to continue where training stopped, on the token
        file it recorded. A corpus, if given, must be the one it was trained
        on; it is needed only when the token file is gone (or the database
        predates token files): then it is tokenized again, to the same ids.
        settings ({field: (option name, value)}, what the user asked for)
        must equal the stored ones: a resumed run keeps its config.
        run_options ({field: value}): stored settings a resumed run may
        change because results do not depend on them (checkpoint_activations).
        A model already at max_iters raises AlreadyTrained, the file untouched.
        prefix: the model under that prefix inside an app's database."""
        store.check_writable(db_path)
        sources = find_sources(corpus, extensions, Path(db_path).parent) if corpus else []
        try:
            digest = fingerprint(sources) if sources else None
            store.open_database(db_path, prefix=prefix).close()  # is it a sqlgpt model at all?
            lock = store.WriterLock(db_path)
            conn = None
            try:
                # every check reads through a read-only connection, so a refused
                # resume leaves the file byte for byte as it was
                with store.snapshot(db_path, prefix) as reader:
                    parts = cls._read_for_resume(db_path, reader, sources, digest, corpus,
                                                 encoding_errors, on_progress, settings,
                                                 run_options)
                    step = parts[-1]["step"]
                    if max_iters is not None and step >= max_iters:
                        history = store.checkpoints(reader)
                        raise AlreadyTrained(step, history[-1]["train_loss"]
                                             if history else None)
                with store.sqlite_errors(f"cannot open {db_path} for training"):
                    # migrates an old file
                    conn = store.open_database(db_path, readonly=False, prefix=prefix)
                return cls(conn, lock, *parts)
            except BaseException:
                if conn is not None:
                    store.close_writer(conn)
                lock.release()
                raise
        finally:
            remove_spools(sources)

    @staticmethod
    def _read_for_resume(db_path, conn, sources, digest, corpus, encoding_errors, on_progress,
                         settings, run_options):
        """(model, cfg, tokenizer, train, val, state) of a database to resume,
        every part checked."""
        arch, cfg = store.read_config(conn)
        lora = store.read_lora(conn)
        _check_unchanged(settings or {}, {**cfg.to_dict(), **arch.to_dict(),
                                          **dict(lora.rows() if lora else [])}, arch)
        tokenizer = store.read_tokenizer(conn, arch, cfg)
        state = store.read_train_state(conn)
        if state.get("imported_from"):
            raise SqlgptError(f"{db_path} was imported from {state['imported_from']} and has no "
                              f"training state of its own: fine-tune it with --base (or "
                              f"--init-from) into a new --db")
        resumable_rng(state)  # a damaged state is refused before anything is written
        if state.get("compacted"):
            raise SqlgptError(f"{db_path} is compacted (sqlgpt compact: no optimizer state); "
                              f"it cannot resume: start a new model from it with --init-from")
        if digest and state.get("corpus_sha256") != digest:
            raise SqlgptError(f"{', '.join(map(str, corpus))} is not the corpus "
                              f"{db_path} was trained on; resume needs the same files")
        tokens = _resume_tokens(db_path, conn.prefix, state, "corpus", tokenizer, sources,
                                encoding_errors, on_progress)
        for name, value in (run_options or {}).items():  # memory or messages, not results
            setattr(cfg, name, value)
        model = store.model_for(conn, db_path, arch, cfg.checkpoint_activations)
        store.read_weights(conn, model)
        train, val = split_tokens(tokens, arch.seq_len, cfg.val_fraction)
        if cfg.val_file:
            val_sources = (_val_sources(cfg.val_file, Path(db_path).parent)
                           if Path(cfg.val_file).is_file() else [])
            val = _val_split(_resume_tokens(db_path, conn.prefix, state, "val", tokenizer,
                                            val_sources, encoding_errors, on_progress),
                             arch.seq_len, cfg.val_file)
        return model, cfg, tokenizer, train, val, state

    # ---- MPI: one model on every rank ----
    @classmethod
    def spread(cls, world, trainer):
        """Rank 0's trainer (None on the other ranks) on every rank of
        world: the others get its configuration, weights, training state
        and token ids from it (the moments, with ZeRO-1, as shards); only
        rank 0 has the database and the held-out split."""
        if world.size == 1:
            return trainer
        header = world.bcast(trainer._header() if world.is_root else None)
        if header["cfg"]["batch_size"] < world.size:
            if trainer:
                trainer.close()
            raise Agreed(SqlgptError(batch_too_small(header["cfg"]["batch_size"], world.size)))
        if not world.is_root:
            arch, cfg = ArchConfig.from_dict(header["arch"]), TrainConfig.from_dict(header["cfg"])
            lora = LoraConfig.from_rows(header["lora"]) if header["lora"] else None
            model = GPT(arch, cfg.checkpoint_activations, lora, moments=not world.zero)
            trainer = cls(None, None, model, cfg, None, None, np.zeros(0, np.uint16),
                          header["state"])
        trainer._join(world, header["tokens"])
        return trainer

    def _header(self):
        lora = self.model.lora
        return {"arch": self.model.arch.to_dict(), "cfg": self.cfg.to_dict(),
                "lora": dict(lora.rows()) if lora else None, "state": self.state,
                "tokens": (len(self.train_tokens), self.train_tokens.dtype.str)}

    def _join(self, world, tokens):
        self.world = world
        model = self.model
        if model.lora:
            world.bcast_array(model.base.arenas["data"])
        arenas = model.params.arenas
        world.bcast_array(arenas["data"])
        if world.zero:
            span = world.shard(arenas["data"].size)
            size = span[1] - span[0]
            moments = ([arenas[b][:size] for b in ("m", "v")] if world.is_root
                       else [aligned_zeros((size,)) for _ in "mv"])
            for full, shard in zip(("m", "v"), moments):
                world.from_root(arenas.get(full), shard)
            self._shard = (span, moments, aligned_zeros((size,)))
        else:
            world.bcast_array(arenas["m"])
            world.bcast_array(arenas["v"])
        self.train_tokens = world.host_array(self.train_tokens, *tokens)

    # ---- running ----
    def run(self, max_iters, save_every=100, max_bad_steps=10, on_step=None, on_checkpoint=None,
            on_diverge=None, stop_on_divergence=False):
        """Train up to step max_iters in total, checkpointing every save_every
        steps, at the end, and when SIGINT/SIGTERM asks to stop. When the
        loss climbs far above its start (see divergence), on_diverge(step,
        recent loss, first loss) is called once, and with stop_on_divergence
        the run stops there without saving the diverged weights (the last
        checkpoint stays the latest)."""
        cfg = self.cfg
        cfg.max_iters = max_iters
        B, T = cfg.batch_size * cfg.grad_accum, self.model.arch.seq_len  # tokens per step
        pending_metrics, last_flush, window_losses = [], time.perf_counter(), []
        result = RunResult(step=self.state["step"], final_loss=math.nan, tokens_per_sec=0.0)
        total_tokens, total_time = 0, 0.0
        with self._stop_on_signals():
            while self.state["step"] < max_iters and not self._stop:
                step = self.state["step"] + 1
                t0 = time.perf_counter()
                loss, lr, grad_norm, skipped = self._step(step, max_bad_steps)
                if not skipped:
                    window_losses.append(loss)
                    result.losses.append(loss)
                    if not result.diverged_at and divergence(result.losses, result.losses[0]):
                        result.diverged_at = step
                        if on_diverge:
                            on_diverge(step, float(np.mean(result.losses[-DIVERGE_WINDOW:])),
                                       result.losses[0])
                        if stop_on_divergence:
                            self._stop = "divergence"
                dt = time.perf_counter() - t0
                self.state["step"] = step
                self.state["elapsed_s"] += dt
                self.state["tokens_seen"] += B * T
                total_tokens, total_time = total_tokens + B * T, total_time + dt
                report = StepReport(step, loss, lr, B * T / dt, skipped)
                if not skipped:
                    pending_metrics.append((step, loss, lr, report.tokens_per_sec, grad_norm))
                if on_step:
                    on_step(report)
                if cfg.eval_every and step % cfg.eval_every == 0 and not skipped:
                    evaluation = self.record_evaluation(step)
                    self._last_val = evaluation.loss if evaluation else None
                if time.perf_counter() - last_flush > METRICS_FLUSH_S:
                    self._write_metrics(pending_metrics)
                    pending_metrics, last_flush = [], time.perf_counter()
                if self._stop == "divergence":
                    break
                if step % save_every == 0 or step == max_iters or self._stop:
                    self._write_metrics(pending_metrics)
                    pending_metrics = []
                    saved = self.checkpoint(window_losses)
                    window_losses = []
                    if on_checkpoint:
                        on_checkpoint(step, *saved)
            self._write_metrics(pending_metrics)
            if self._stop in EXIT_SIGNALS and self.saved_step != self.state["step"]:
                self.checkpoint(window_losses)  # a signal that came after the loop's last test
        result.step = self.state["step"]
        result.final_loss = result.losses[-1] if result.losses else math.nan
        result.tokens_per_sec = total_tokens / total_time if total_time else 0.0
        result.stopped_by = self._stop
        result.bad_steps = self.state["bad_steps"]
        return result

    def _write_metrics(self, rows):
        if self.conn is not None:  # rank 0's
            store.write_metrics(self.conn, rows)

    def _step(self, step, max_bad_steps):
        """One optimizer step on grad_accum random micro-batches: (loss, lr,
        gradient norm, skipped). A step whose loss or gradient is NaN/Inf
        changes no weight; it is counted. Over MPI, every rank draws the
        same windows and takes its rows of each micro-batch."""
        cfg, model, world = self.cfg, self.model, self.world
        B, N = cfg.batch_size, cfg.grad_accum
        # all windows at once: N micro-batches are one batch N times larger, split
        x, y = random_batch(self.train_tokens, self.rng, B * N, model.arch.seq_len)
        # one draw per step whatever N is, so the batches of later steps do not
        # depend on it; micro-batch i's dropout seed is spread from it
        seed = int(self.rng.integers(0, 2**63))
        seeds = [(seed + MICRO_SEED_STRIDE * i) % 2**64 for i in range(N)]
        first, last = world.rows(B)
        model.params.zero_grad()
        losses = []
        for i, seed in enumerate(seeds):
            rows = slice(i * B + first, i * B + last)
            losses.append(model.forward(x[rows], y[rows], dropout=cfg.dropout_at(step),
                                        dropout_seed=seed, first_row=first))
            model.backward()
        # the mean over micro-batches, as one batch's mean; a rank's part of it
        share = (last - first) / B
        loss = (losses[0] if N == 1 else float(np.mean(losses))) * share
        if share / N != 1.0:
            model.params.scale_grad(share / N)
        loss, grad_sq = self._reduce(loss)
        lr = cfg.lr_at(step)
        if not (math.isfinite(loss) and math.isfinite(grad_sq)):
            self.state["bad_steps"] += 1
            if self.state["bad_steps"] > max_bad_steps:  # on every rank alike
                error = SqlgptError(f"training stopped at step {step}: more than "
                                    f"{max_bad_steps} steps had a NaN/Inf loss or gradient; the "
                                    f"last good checkpoint is kept (try a lower --lr)")
                raise Agreed(error) if world.size > 1 else error
            return loss, lr, math.nan, True
        span, moments, _ = self._shard or (None, None, None)
        if cfg.grad_clip > 0 and grad_sq > cfg.grad_clip ** 2:
            model.params.scale_grad(cfg.grad_clip / math.sqrt(grad_sq), span)
        model.optimizer_step(step, lr, cfg.optimizer, cfg.beta1, cfg.beta2, cfg.eps,
                             cfg.weight_decay, cfg.momentum, span, moments)
        if span:
            world.gather_shards(model.params.arenas["data"])
        return loss, lr, math.sqrt(grad_sq), False

    def _reduce(self, loss):
        """(loss, squared gradient norm) over every rank, their gradients
        summed (with ZeRO-1: this rank's shard of the sum); the ranks agree
        here on a signal any of them received."""
        world, grad = self.world, self.model.params.arenas["grad"]
        if world.size == 1:
            return loss, self.model.grad_norm_squared()
        if self._shard:
            (start, stop), _, summed = self._shard
            world.scatter_sum(grad, summed)
            grad[start:stop] = summed
        else:
            world.sum_(grad)
            start, stop = world.shard(grad.size)
        partial = lib.sum_squares(fptr(grad[start:stop]), stop - start)
        code = SIGNAL_CODES[self._signalled]
        agreed = world.agree(np.array([loss, partial, code == 1, code == 2], np.float64))
        if agreed[3] or agreed[2]:
            self._stop = self._stop or ("SIGTERM" if agreed[3] else "SIGINT")
        return float(agreed[0]), float(agreed[1])

    def checkpoint(self, window_losses):
        """Save the step (rank 0 writes; with ZeRO-1 the moments' shards are
        collected to it first): (train loss, val loss)."""
        arenas, world = self.model.params.arenas, self.world
        if self._shard:
            _, moments, _ = self._shard
            for name, shard in zip(("m", "v"), moments):
                world.to_root(arenas.get(name), shard)
        if not world.same_weights(arenas["data"]):  # cannot happen: say so if it does
            raise Agreed(SqlgptError(f"the ranks' weights differ at step {self.state['step']}; "
                                     f"the last checkpoint is kept"))
        world.on_root(self._check_finite)  # before an evaluation is recorded for the step
        train_loss = float(np.mean(window_losses)) if window_losses else None
        self.state["rng"] = self.rng.bit_generator.state
        if not self.cfg.eval_every:
            evaluation = self.record_evaluation(self.state["step"])
            self._last_val = evaluation.loss if evaluation else None
        val_loss = self._last_val
        world.on_root(lambda: self._save(train_loss, val_loss))
        self.saved_step = self.state["step"]
        return train_loss, val_loss

    def _check_finite(self):
        arenas = self.model.params.arenas
        if not all(np.isfinite(arenas[b]).all() for b in ("data", "m", "v")):
            raise SqlgptError(f"the weights became NaN or Inf by step {self.state['step']} "
                              f"(learning rate too high?); the last good checkpoint is kept")

    def _save(self, train_loss, val_loss):
        store.save_checkpoint(self.conn, self.model, self.cfg, self.state, train_loss, val_loss)

    def evaluate(self):
        """The held-out split scored in eval mode (no RNG used): eval_iters
        batches of windows spread over it, or all of it; None without one."""
        cfg, T = self.cfg, self.model.arch.seq_len
        if len(self.val_tokens) < T + 1:
            return None
        # whole batches of the training batch size, so no new activations are
        # allocated (with eval_iters 0, the last batch of the split may be short)
        windows = len(self.val_tokens) - T
        B = min(cfg.batch_size, windows)
        limit = min(cfg.eval_iters, windows // B) * B if cfg.eval_iters else None
        return evaluate(self.model, self.val_tokens, stride=T, batch_size=B, limit=limit)

    def latest_val(self):
        """The latest evaluation's loss in this run (None before the first)."""
        return self._last_val

    def record_evaluation(self, step):
        """Evaluate, store the result and keep the best step in the state
        (over MPI: rank 0, which has the held-out split; the others get
        its best step)."""
        if self.world.size > 1:
            result = self.world.on_root(lambda: self._record_evaluation(step))
            best = self.world.bcast(self.state.get("best_val"))
            if best is not None:
                self.state["best_val"] = best
            return result
        return self._record_evaluation(step)

    def _record_evaluation(self, step):
        result = self.evaluate()
        if result is None or not math.isfinite(result.loss):  # nothing held out, or diverged
            return None
        best = self.state.get("best_val")
        if best is None or result.loss < best["loss"]:
            self.state["best_val"] = {"step": step, "loss": result.loss}
        store.write_evaluation(self.conn, step, result)
        return result

    def close(self):
        if self.conn is not None:  # rank 0's
            store.close_writer(self.conn)
            self.lock.release()

    # ---- signals: finish the step, save, then stop ----
    class _SignalGuard:
        def __init__(self, trainer):
            self.trainer, self.saved = trainer, {}

        def __enter__(self):
            if threading.current_thread() is not threading.main_thread():
                return self
            for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
                self.saved[sig] = signal.signal(sig, self._handler(name))
            return self

        def _handler(self, name):
            def handle(signum, frame):
                trainer = self.trainer
                if trainer._stop or trainer._signalled:  # a second: stop now, the last
                    raise KeyboardInterrupt                # checkpoint stands
                if trainer.world.size > 1:  # the ranks stop together, at the next step's end
                    trainer._signalled = name
                else:
                    trainer._stop = name
            return handle

        def __exit__(self, *exc):
            for sig, handler in self.saved.items():
                signal.signal(sig, handler)

    def _stop_on_signals(self):
        return self._SignalGuard(self)
