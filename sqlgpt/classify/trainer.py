"""Fine-tuning a base model into a classifier: Trainer's loop (steps,
checkpoints, metrics, signals) over labelled rows instead of token
windows, scored on the held-out rows by accuracy, macro-F1 and the
confusion matrix."""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import store
from ..errors import SqlgptError
from ..model.lora import base_digest, base_reference, merged
from ..model.model import GPT
from ..train.trainer import Trainer
from .data import Examples, label_names, read_labelled, scores
from .predict import probabilities


class ClassifierTrainer(Trainer):
    """A Trainer whose rows are labelled examples (data.Examples)."""

    @classmethod
    def create_classifier(cls, db_path, source, base_path, cfg, pool="last", lora=None,
                          overwrite=False, prefix=""):
        """A new classifier in db_path: base_path's model (read only) with a
        head of the source's labels, pooling its final hidden states by pool;
        its labels, its rows' digest and the held-out split recorded."""
        db_path = Path(db_path)
        store.check_new_location(db_path, overwrite, store.check_prefix(prefix))
        if not base_path:
            raise SqlgptError("--task classify fine-tunes a model: name it with --base")
        if Path(base_path).resolve() == db_path.resolve():
            raise SqlgptError("--base and --db name the same file; the base model is only "
                              "read: name a new --db")
        cfg.validate()
        with store.snapshot(base_path) as conn:
            base, base_cfg, tokenizer, _, _ = store.read_checkpoint(conn, base_path)
        if base.arch.num_labels:
            raise SqlgptError(f"{base_path} is a classifier already: give its language model "
                              f"as --base")
        if lora is not None and base.lora is not None:
            raise SqlgptError(f"the base {base_path} is itself a LoRA fine-tune: sqlgpt merge "
                              f"it into a plain model first")
        pairs = list(read_labelled(source))
        labels = label_names(pairs)
        arch = replace(base.arch, num_labels=len(labels), pool=pool).validate()
        examples, cut, digest = Examples.encode(pairs, tokenizer, labels, arch.seq_len)
        train, val = examples.split(cfg.val_fraction, cfg.seed)
        cfg.tokenizer, cfg.vocab_size = base_cfg.tokenizer, base_cfg.vocab_size
        if lora is not None:
            lora.validate(arch)
            lora.base = base_reference(base_path, db_path)
        model = GPT(arch, cfg.checkpoint_activations, lora)
        rng = np.random.default_rng(cfg.seed)
        model.init_weights(rng)  # the head (and a fine-tune's adapters)
        weights = merged(base)
        for t in model.base:
            if t.name in weights:
                t.data[...] = weights[t.name]
        if lora is not None:
            lora.base_sha256 = base_digest(model.base)
        record = {"source": str(source), "sha256": digest, "examples": len(examples),
                  "held_out": len(val) if val is not None else 0, "cut": cut,
                  "pool": pool, "labels": len(labels)}
        state = {"step": 0, "rng": rng.bit_generator.state, "corpus_sha256": digest,
                 "classify": record, "elapsed_s": 0.0, "bad_steps": 0, "tokens_seen": 0}
        counts = np.zeros(tokenizer.n_ids, dtype=np.int64)
        with store.sqlite_errors(f"cannot create {db_path}"):
            conn, lock = store.create_database(db_path, model, cfg, tokenizer, state, overwrite,
                                               counts, prefix, labels=labels)
        trainer = cls(conn, lock, model, cfg, tokenizer, train, val, state)
        trainer.labels = labels
        return trainer

    def _draw(self, n):
        return self.train_tokens.batch(self.rng, n)

    def _forward_backward(self, batch, rows, first, dropout, seed):
        loss = self.model.classify_forward(batch.ids[rows], batch.lens[rows], batch.labels[rows],
                                           dropout=dropout, dropout_seed=seed)
        self.model.classify_backward()
        return loss

    def evaluate(self):
        """Scores on the held-out rows (eval mode), or None without any."""
        if self.val_tokens is None:
            return None
        probs, loss = probabilities(self.model, self.val_tokens)
        return scores(loss, probs.argmax(axis=1), self.val_tokens.labels,
                      self.model.arch.num_labels)

    def _record_evaluation(self, step):
        result = self.evaluate()
        if result is None or not math.isfinite(result.loss):
            return None
        best = self.state.get("best_val")
        if best is None or result.loss < best["loss"]:
            self.state["best_val"] = {"step": step, "loss": result.loss,
                                      "accuracy": result.accuracy}
        store.write_classifier_eval(self.conn, step, result)
        self.last_scores = result
        return result


# the head's tensors: trained with the adapters in a LoRA fine-tune
CLASSIFIER_TENSORS = ("cls_w", "cls_b")
