"""The Python API for apps: load a trained model from its database and use it.

    m = sqlgpt.load("model.db")
    m.generate("the king", max_tokens=30, temperature=0.8, top_k=40, seed=1)
"""
import tempfile
from pathlib import Path

import numpy as np

from . import store
from .corpus import find_sources
from .dataset import write_tokens
from .errors import SqlgptError
from .evaluate import evaluate
from .generate import Decoder, check_precision, generate_ids
from .model import GPT, PAD_ID


class Model:
    """A trained model: config, tokenizer and weights of the latest checkpoint.
    precision ("fp32" or "bf16") is the weights' format while generating."""

    def __init__(self, gpt, train_cfg, tokenizer, step, precision="fp32", corpus=None):
        check_precision(precision)
        self._gpt, self.tokenizer, self.step = gpt, tokenizer, step
        # what the model was trained on: {files: [{path, bytes}], sha256, tokens}
        self.corpus = corpus or {}
        self.train_config = train_cfg
        self.precision = precision
        self._decoder = None  # made on first use: packing the weights is a model-sized copy

    @property
    def config(self):
        """Architecture and training settings, as stored (one flat dict)."""
        return {**self.train_config.to_dict(), **self._gpt.arch.to_dict()}

    @property
    def arch(self):
        return self._gpt.arch

    def state_dict(self):
        """{name: float32 array} of every stored tensor, under the tensor
        table's names (copies; a tied head is wte)."""
        return {t.name: t.data.copy() for t in self._gpt.params}

    def state_dict_view(self):
        """{name: the model's own float32 array} (no copies: do not modify)."""
        return {t.name: t.data for t in self._gpt.params}

    def num_parameters(self):
        return self._gpt.params.size

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def logits(self, ids):
        """Eval-mode logits (len, n_vocab) for a 1-D sequence of ids."""
        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        self._gpt.forward(ids)
        return self._gpt.acts.logits[: ids.shape[1]].copy()

    def prompt_ids(self, prompt):
        """Prompt -> ids (the last seq_len of them). An empty prompt starts a
        new document: after <eos> where the tokenizer has one, else from the
        most frequent word."""
        tok = self.tokenizer
        if not prompt:
            return np.array([tok.eos_id if tok.eos_id is not None else 1], dtype=np.int32)
        ids = self.encode(prompt)
        if len(ids) == 0:
            raise SqlgptError("the prompt has no words" if tok.kind == "word"
                              else "the prompt has no tokens")
        if tok.unk_id is not None and (ids == tok.unk_id).all():
            raise SqlgptError(f"none of the prompt's tokens are in the vocabulary: {prompt!r}")
        return ids[-self._gpt.arch.seq_len:]

    def _banned(self, allow_unk):
        """Ids never sampled: <pad>, <bos>, and <unk> unless allowed."""
        tok = self.tokenizer
        banned = {PAD_ID, tok.bos_id} | (set() if allow_unk else {tok.unk_id})
        return tuple(sorted(i for i in banned if i is not None))

    def generate_ids(self, prompt="", max_tokens=50, temperature=1.0, top_k=0, top_p=1.0,
                     seed=None, allow_unk=False):
        """Yield generated ids one at a time (for streaming), ending early at
        <eos> (which is not yielded). <pad> and <bos> are never sampled, and
        <unk> only with allow_unk."""
        if self._decoder is None:
            self._decoder = Decoder(self._gpt, self.precision)
        for token in generate_ids(self._decoder, self.prompt_ids(prompt), max_tokens, temperature,
                                  top_k, top_p, seed, banned=self._banned(allow_unk)):
            if token == self.tokenizer.eos_id:
                return
            yield token

    def stream(self, prompt="", max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, seed=None,
               allow_unk=False):
        """Yield the generated text in pieces as tokens come: the prompt's
        text first, then what each token adds. A token that ends inside a
        UTF-8 character (byte and BPE pieces can) is held back until the
        character is whole."""
        ids = [int(i) for i in self.prompt_ids(prompt)]
        shown = ""
        for token in [None, *self.generate_ids(prompt, max_tokens, temperature, top_k, top_p,
                                               seed, allow_unk)]:
            if token is not None:
                ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                yield text[len(shown):]
                shown = text
        text = self.decode(ids)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]

    def generate(self, prompt="", max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                 allow_unk=False):
        """The prompt followed by up to max_tokens generated tokens, as text."""
        ids = list(self.prompt_ids(prompt))
        ids += self.generate_ids(prompt, max_tokens, temperature, top_k, top_p, seed, allow_unk)
        return self.decode(ids)


    def evaluate(self, text=None, paths=(), stride=None, batch_size=8, extensions=(),
                 encoding_errors="strict"):
        """Loss per token, perplexity, accuracy and tokens scored on a text,
        or on files and directories (each a document, separated by <eos>),
        tokenized by a stream into a temporary file (flat memory). stride:
        see sqlgpt.evaluate (default: half the context)."""
        if text is not None:
            return evaluate(self._gpt, self.encode(text), stride, batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            sources = find_sources(paths, extensions, spool_dir=tmp)
            info = write_tokens(sources, self.tokenizer, Path(tmp) / "eval.tokens",
                                encoding_errors)
            tokens = np.memmap(Path(tmp) / "eval.tokens", dtype=np.dtype(info["dtype"]),
                               mode="r")
            return evaluate(self._gpt, tokens, stride, batch_size)


def load(path, precision="fp32", step=None, prefix=""):
    """Load the latest checkpoint of a sqlgpt database (read-only), or with
    step an older one that `train --keep` kept. With precision "bf16",
    generation reads the matrices rounded to bfloat16. prefix: the model
    kept under that table prefix inside an app's database."""
    check_precision(precision)
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise SqlgptError(f"step must be an integer >= 0, got {step!r}")
    conn = store.open_database(path, readonly=True, prefix=prefix)
    try:
        with store.sqlite_errors(f"cannot read {path}"):
            conn.execute("BEGIN")  # one snapshot: a trainer may commit while we read
            arch, cfg = store.read_config(conn)
            tokenizer = store.read_tokenizer(conn, arch, cfg)
            gpt = GPT(arch)
            state = store.read_train_state(conn)
            latest = state.get("step")
            if not isinstance(latest, int) or latest < 0:
                raise SqlgptError(f"{path} is damaged: no valid training step")
            if step is None or step == latest:
                store.read_weights(conn, gpt)
                step = latest
            else:
                kept = store.kept_steps(conn)
                if step not in kept:
                    raise SqlgptError(f"{path} keeps no checkpoint at step {step} (kept: "
                                      f"{', '.join(map(str, kept)) or 'none'}; latest: {latest}"
                                      f"); train with --keep N to keep older ones")
                store.read_kept_weights(conn, gpt, step)
    finally:
        conn.close()
    return Model(gpt, cfg, tokenizer, step, precision, corpus_of(state))


def corpus_of(state):
    """The corpus a training state records (older files: its hash alone)."""
    tokens = state.get("tokens") if isinstance(state.get("tokens"), dict) else {}
    files = state.get("corpus") if isinstance(state.get("corpus"), list) else []
    return {"files": files, "sha256": state.get("corpus_sha256"), "tokens": tokens.get("count")}
