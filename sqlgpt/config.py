"""Training settings (the architecture is arch.ArchConfig), and the one flat
key/value record both are stored as in the database's config table."""
import math
from dataclasses import dataclass

from .arch import ArchConfig, StoredFields
from .errors import SqlgptError

TOKENIZER_KINDS = ("word", "char", "byte", "bpe")
# keys every stored config must have (schema version 1 had these too)
REQUIRED_KEYS = ("vocab_size", "embed_dim", "num_heads", "num_layers", "seq_len")


@dataclass
class TrainConfig(StoredFields):
    """How a model is trained; names match the original's `cfg` keys."""
    vocab_size: int = 426     # word: words kept (plus <pad>, <unk>); char: characters kept
                              # (0: all); bpe: token ids in all; byte: not used
    tokenizer: str = "word"
    batch_size: int = 32
    lr: float = 3e-4
    max_iters: int = 1000     # the original shipped 1 ("increase for actual training")
    dropout: float = 0.2      # train mode only, on each sublayer's output
    beta1: float = 0.9        # plain Adam, as the original
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # > 0 turns Adam into AdamW (on the decay group only)
    grad_clip: float = 0.0    # clip the global gradient norm to this (0: off, as the original)
    lr_schedule: str = "constant"  # or "cosine": decay to lr/10 at max_iters
    warmup_iters: int = 0     # linear warm-up steps before the schedule
    seed: int = 1337

    def validate(self):
        """Raise SqlgptError for settings that cannot be trained with."""
        # vocab_size 0: every character (char), not used (byte)
        limits = {"vocab_size": (0 if self.tokenizer in ("char", "byte") else 1, 10**7),
                  "batch_size": (1, 2**20), "max_iters": (1, 2**31 - 1)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise SqlgptError(f"{name} must be an integer from {low} to {high:,}, "
                                  f"got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise SqlgptError(f"seed must be an integer from 0 to 2**63-1, got {self.seed!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SqlgptError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1e3):
            raise SqlgptError(f"lr must be a positive number up to 1000, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise SqlgptError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise SqlgptError("beta1 and beta2 must be in [0, 1) and eps positive")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SqlgptError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SqlgptError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not isinstance(self.warmup_iters, int) or not 0 <= self.warmup_iters < 2**31:
            raise SqlgptError(f"warmup_iters must be >= 0, got {self.warmup_iters!r}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise SqlgptError(f"unknown tokenizer {self.tokenizer!r} "
                              f"(known: {', '.join(TOKENIZER_KINDS)})")
        return self

    def lr_at(self, step):
        """Learning rate for a 1-based step: warm-up, then constant or cosine."""
        if step <= self.warmup_iters:
            return self.lr * step / (self.warmup_iters + 1)
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.max_iters - self.warmup_iters)
        progress = min(1.0, (step - self.warmup_iters) / span)
        min_lr = self.lr / 10
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))


def to_rows(arch, train):
    """The config table's (key, value) pairs for a model."""
    return list({**train.to_dict(), **arch.to_dict()}.items())


def from_rows(values):
    """(ArchConfig, TrainConfig) from the config table's key/values, both
    validated. A schema-1 database has no architecture keys: it is the lua
    preset, whose ids are the words plus <pad> and <unk>."""
    missing = [k for k in REQUIRED_KEYS if k not in values]
    if missing:
        raise SqlgptError(f"the config table is missing {', '.join(missing)}")
    values = dict(values)
    if "n_vocab" not in values and isinstance(values["vocab_size"], int):
        values["n_vocab"] = values["vocab_size"] + 2
    try:
        return ArchConfig.from_dict(values).validate(), TrainConfig.from_dict(values).validate()
    except SqlgptError as e:
        raise SqlgptError(f"the stored config is invalid: {e}") from None
