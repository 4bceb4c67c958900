"""Continuous batching: one thread decodes every active request of a model
together, a KV cache slot each, in one batched decode step per token.

A request joins between steps (its whole prompt fed in the step it joins)
and leaves as soon as it ends, is cancelled or its client goes: its slot is
free for the next step. Each row's logits are the ones it gets alone (the
decode step sums each row in the same order whatever the batch), and each
request draws from its own generator (seed, as Model.generate seeds it), so
an answer is the one it gets served alone. Every kernel call runs on this
thread: the event loop only hands requests in and results out.
"""
import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..api import TextStream
from ..errors import SqlgptError
from ..inference.beam import log_softmax
from ..inference.sampling import Sampler, sequence_rng


@dataclass
class Piece:
    """What one generated token adds: its id, the text it shows, its
    log-probability and the most likely alternatives [(id, logprob)]."""
    token: int
    text: str
    logprob: float = None
    top: list = None


@dataclass
class Job:
    """One sequence to generate: its prompt ids and how to draw; deliver(kind,
    value) is called from the scheduler thread ("piece" with a Piece, then
    "done" with the finish reason, or "error" with a message)."""
    prompt: list
    max_tokens: int
    sampler: Sampler
    seed: object
    end_id: object
    stop: tuple
    deliver: object
    top_logprobs: int = -1           # -1: no log-probabilities; k >= 0: and the k most likely
    banned: tuple = ()
    cancelled: bool = False
    slot: int = -1
    context: list = field(default_factory=list)
    fed: int = 0                     # ids of context in the slot's cache
    made: int = 0
    submitted: float = 0.0
    first_token_s: float = None


class Scheduler:
    """The decoding thread of one model, `slots` sequences at a time, with
    at most `queue_limit` waiting."""

    def __init__(self, model, slots, queue_limit, metrics=None):
        self.model, self.slots, self.queue_limit = model, slots, queue_limit
        self.decoder = model.decoder(slots)
        self.metrics = metrics
        self.pending = collections.deque()
        self.active = {}                    # slot -> Job
        self.calls = queue.Queue()          # (fn, Future): other kernel work, between steps
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="sqlgpt-decode", daemon=True)
        self.thread.start()

    # ---- from the event loop ----
    def submit(self, job):
        """Queue a job (SqlgptError "busy" when the queue is full)."""
        with self.wake:
            if len(self.pending) >= self.queue_limit:
                raise QueueFull(f"{len(self.pending)} requests are waiting; try again soon")
            job.submitted = time.monotonic()
            job.context = list(job.prompt)
            self.pending.append(job)
            self.wake.notify()

    def cancel(self, job):
        job.cancelled = True
        with self.wake:
            self.wake.notify()

    def call(self, fn):
        """A Future of fn() run on the decoding thread between steps (the
        kernel's other work: embeddings, prompt scores)."""
        future = Future()
        self.calls.put((fn, future))
        with self.wake:
            self.wake.notify()
        return future

    def busy(self):
        return len(self.active)

    def waiting(self):
        return len(self.pending)

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    # ---- the decoding thread ----
    def _loop(self):
        while True:
            with self.wake:
                while not (self.stopping or self.pending or self.active or
                           not self.calls.empty()):
                    self.wake.wait(timeout=1.0)
                if self.stopping:
                    break
                self._admit()
            self._run_calls()
            self._drop_cancelled()
            if self.active:
                try:
                    self._step()
                except Exception as e:  # a failed step ends its requests, never the server
                    for job in list(self.active.values()):
                        self._finish(job, None, f"{type(e).__name__}: {e}")
        for job in [*self.active.values(), *self.pending]:
            job.deliver("error", "the server is shutting down")

    def _admit(self):
        free = [s for s in range(self.slots) if s not in self.active]
        while free and self.pending:
            job = self.pending.popleft()
            if job.cancelled:
                continue
            job.slot = free.pop(0)
            job.fed = 0
            self.active[job.slot] = job
            job.rng = sequence_rng(job.seed, 0)
            job.text = TextStream(self.model.tokenizer, job.prompt, job.stop)

    def _run_calls(self):
        while not self.calls.empty():
            fn, future = self.calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: B902 (handed to the caller)
                    future.set_exception(e)

    def _drop_cancelled(self):
        for job in [j for j in self.active.values() if j.cancelled]:
            self._finish(job, "cancelled")

    def _step(self):
        jobs = list(self.active.values())
        slots, tokens, positions, out_rows = [], [], [], []
        for job in jobs:
            feed = job.context[job.fed:]
            slots += [job.slot] * len(feed)
            positions += range(job.fed, job.fed + len(feed))
            tokens += feed
            out_rows.append(len(tokens) - 1)
            job.fed += len(feed)
        logits = self.decoder.run(slots, tokens, positions, out_rows)
        now = time.monotonic()
        for job, row in zip(jobs, logits):
            token = job.sampler.sample(row, job.rng, job.context if
                                       job.sampler.repetition_penalty != 1.0 else (), job.banned)
            if job.first_token_s is None:
                job.first_token_s = now - job.submitted
                if self.metrics:
                    self.metrics.first_token(job.first_token_s)
            job.made += 1
            if token == job.end_id:
                self._finish(job, "stop")
                continue
            job.context.append(token)
            piece = Piece(token, job.text.push(token))
            if job.top_logprobs >= 0:
                lp = log_softmax(row)
                piece.logprob = float(lp[token])
                top = np.argsort(-lp, kind="stable")[:job.top_logprobs]
                piece.top = [(int(i), float(lp[i])) for i in top]
            job.deliver("piece", piece)
            if job.text.stopped:
                self._finish(job, "stop")
            elif job.made >= job.max_tokens or len(job.context) >= self.model.context:
                self._finish(job, "length")

    def _finish(self, job, reason, error=None):
        self.active.pop(job.slot, None)
        if error is not None:
            job.deliver("error", error)
            return
        if reason != "cancelled":
            rest = job.text.finish()
            if rest:
                job.deliver("piece", Piece(-1, rest))
        job.deliver("done", reason)


class QueueFull(SqlgptError):
    """Too many requests wait for a slot."""
