"""Training: corpus -> token ids (once, in a file) -> random windows -> steps -> checkpoints.

Every source of randomness (weight init, batch positions, dropout seeds) comes
from one numpy PCG64 generator whose state is saved with each checkpoint, so a
resumed run continues exactly as an uninterrupted one would.
"""
import math
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import store
from .._kernel import lib
from ..errors import SqlgptError
from ..model.arch import ArchConfig
from ..model.config import TrainConfig
from ..model.lora import LoraConfig
from ..model.model import GPT
from ..model.tensor import aligned_zeros, fptr
from .distributed import SIGNAL_CODES, Agreed, World, batch_too_small
from .evaluate import evaluate, evaluate_chat
from ..chat.data import ChatTokens
from .setup import TrainerSetup, resumable_rng

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


def divergence(losses, start):
    """True when the mean of the last DIVERGE_WINDOW losses is more than
    DIVERGE_FACTOR times the run's first loss (or not finite)."""
    if len(losses) < DIVERGE_WINDOW:
        return False
    recent = float(np.mean(losses[-DIVERGE_WINDOW:]))
    return not math.isfinite(recent) or recent > DIVERGE_FACTOR * start


class Trainer(TrainerSetup):
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
        if header["cfg"]["batch_size"] < world.size or header["chat"]:
            if trainer:
                trainer.close()
            raise Agreed(SqlgptError("a chat fine-tune runs in one process (not under mpirun)"
                                     if header["chat"] else
                                     batch_too_small(header["cfg"]["batch_size"], world.size)))
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
                "chat": isinstance(self.train_tokens, ChatTokens),
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
        # all rows at once: N micro-batches are one batch N times larger, split
        batch = self._draw(B * N)
        # one draw per step whatever N is, so the batches of later steps do not
        # depend on it; micro-batch i's dropout seed is spread from it
        seed = int(self.rng.integers(0, 2**63))
        seeds = [(seed + MICRO_SEED_STRIDE * i) % 2**64 for i in range(N)]
        first, last = world.rows(B)
        model.params.zero_grad()
        losses = [self._forward_backward(batch, slice(i * B + first, i * B + last), first,
                                         cfg.dropout_at(step), seed)
                  for i, seed in enumerate(seeds)]
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

    def _draw(self, n):
        """n training rows (x, y): windows of the corpus, or conversations."""
        T = self.model.arch.seq_len
        if isinstance(self.train_tokens, ChatTokens):  # conversations, the assistant's loss
            return self.train_tokens.batch(self.rng, n, T)
        return random_batch(self.train_tokens, self.rng, n, T)

    def _forward_backward(self, batch, rows, first, dropout, seed):
        """One micro-batch's loss, its gradients accumulated."""
        x, y = batch
        loss = self.model.forward(x[rows], y[rows], dropout=dropout, dropout_seed=seed,
                                  first_row=first)
        self.model.backward()
        return loss

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
        if isinstance(self.train_tokens, ChatTokens):
            return evaluate_chat(self.model, self.val_tokens, cfg.batch_size,
                                 cfg.eval_iters * cfg.batch_size) if self.val_tokens else None
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
