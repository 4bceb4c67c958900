"""Training settings (the architecture is arch.ArchConfig), and the one flat
key/value record both are stored as in the database's config table."""
import math
from dataclasses import dataclass

from .arch import ArchConfig, StoredFields
from ..contract import IMPORTED_TOKENIZER_KINDS, REQUIRED_CONFIG_KEYS, TOKENIZER_KINDS
from ..errors import SqlgptError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


# training settings a resumed run may change: how it learns from here on, not
# what the model or its data is (those need a new model: --init-from)
RESUMABLE = ("lr", "lr_schedule", "warmup_iters", "lr_decay_iters", "min_lr", "batch_size",
             "grad_accum", "grad_clip", "dropout", "dropout_final", "weight_decay",
             "eval_every", "eval_iters")


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
    dropout_final: float = -1.0  # linear annealing from dropout to this over the decay
                                 # length (lr_decay_iters); -1: no annealing
    optimizer: str = "adamw"  # adamw (decoupled decay), adam (decay as L2), or sgd
    beta1: float = 0.9        # with weight_decay 0, plain Adam, as the original
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0     # sgd only (torch.optim.SGD's default)
    weight_decay: float = 0.0  # on the tensor table's decay group only (matrices, embeddings)
    grad_clip: float = 0.0    # clip the global gradient norm to this (0: off, as the original)
    grad_accum: int = 1       # micro-batches of batch_size per step
    lr_schedule: str = "constant"  # constant, cosine or linear from lr to min_lr
    warmup_iters: int = 0     # linear warm-up steps before the schedule
    lr_decay_iters: int = 0   # the step where decay ends, fixed when a model is created
                              # (0, in databases from before: the current max_iters)
    min_lr: float = -1.0      # where decay ends (-1, in databases from before: lr / 10)
    val_fraction: float = 0.1  # the corpus tail held out for evaluation (unless val_file)
    val_file: str = ""        # a held-out text instead, tokenized beside the database
    eval_every: int = 0       # evaluate every N steps (0: at each checkpoint)
    eval_iters: int = 4       # batches per evaluation (0: the whole held-out split)
    seed: int = 1337
    checkpoint_activations: bool = False  # recompute blocks in backward (memory, not results)
    keep: int = 0             # older checkpoints whose weights are kept (plus the best)

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
        if not (self.dropout_final == -1.0 or 0.0 <= self.dropout_final < 1.0):
            raise SqlgptError(f"dropout_final must be in [0, 1), got {self.dropout_final}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1e3):
            raise SqlgptError(f"lr must be a positive number up to 1000, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise SqlgptError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise SqlgptError("beta1 and beta2 must be in [0, 1) and eps positive")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SqlgptError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in SCHEDULES:
            raise SqlgptError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SqlgptError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise SqlgptError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise SqlgptError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("eval_every", "eval_iters", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 2**31:
                raise SqlgptError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.grad_accum, int) or not 1 <= self.grad_accum <= 2**16:
            raise SqlgptError(f"grad_accum must be an integer from 1 to 65,536, "
                              f"got {self.grad_accum!r}")
        if not isinstance(self.lr_decay_iters, int) or not 0 <= self.lr_decay_iters < 2**31:
            raise SqlgptError(f"lr_decay_iters must be >= 0, got {self.lr_decay_iters!r}")
        if not (math.isfinite(self.min_lr) and (self.min_lr == -1.0 or
                                                0 <= self.min_lr <= self.lr)):
            raise SqlgptError(f"min_lr must be from 0 to lr ({self.lr}), got {self.min_lr}")
        if not isinstance(self.warmup_iters, int) or not 0 <= self.warmup_iters < 2**31:
            raise SqlgptError(f"warmup_iters must be >= 0, got {self.warmup_iters!r}")
        if self.tokenizer not in TOKENIZER_KINDS + IMPORTED_TOKENIZER_KINDS:
            raise SqlgptError(f"unknown tokenizer {self.tokenizer!r} "
                              f"(known: {', '.join(TOKENIZER_KINDS)})")
        return self

    def lr_at(self, step):
        """Learning rate for a 1-based step: linear warm-up, then constant, or
        cosine or linear decay to min_lr at lr_decay_iters, min_lr after."""
        if step <= self.warmup_iters:
            return self.lr * step / (self.warmup_iters + 1)
        if self.lr_schedule == "constant":
            return self.lr
        min_lr = self.min_lr if self.min_lr >= 0 else self.lr / 10
        span = max(1, (self.lr_decay_iters or self.max_iters) - self.warmup_iters)
        progress = min(1.0, (step - self.warmup_iters) / span)
        if self.lr_schedule == "linear":
            return self.lr + (min_lr - self.lr) * progress
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))

    def dropout_at(self, step):
        """Dropout rate for a 1-based step: dropout, or with dropout_final a
        straight line from dropout at step 0 to dropout_final at the decay
        length (fixed when the model was created), dropout_final after."""
        if self.dropout_final < 0:
            return self.dropout
        progress = min(1.0, step / max(1, self.lr_decay_iters or self.max_iters))
        return self.dropout + (self.dropout_final - self.dropout) * progress

def to_rows(arch, train):
    """The config table's (key, value) pairs for a model."""
    return list({**train.to_dict(), **arch.to_dict()}.items())


def from_rows(values):
    """(ArchConfig, TrainConfig) from the config table's key/values, both
    validated. A schema-1 database has no architecture keys: it is the lua
    preset, whose ids are the words plus <pad> and <unk>."""
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in values]
    if missing:
        raise SqlgptError(f"the config table is missing {', '.join(missing)}")
    values = dict(values)
    if "n_vocab" not in values and isinstance(values["vocab_size"], int):
        values["n_vocab"] = values["vocab_size"] + 2
    try:
        return ArchConfig.from_dict(values).validate(), TrainConfig.from_dict(values).validate()
    except SqlgptError as e:
        raise SqlgptError(f"the stored config is invalid: {e}") from None


def read_run_file(path):
    """The settings of a run file (.yaml, .yml or .toml): a mapping of option
    names (dashes or underscores) to values, as one flat dict with
    underscores. A one-line error for a missing, unreadable or malformed file."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise SqlgptError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SqlgptError(f"cannot read config file {path}: {e}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python before 3.11
                raise SqlgptError(f"reading {path} needs Python 3.11 or later (tomllib); "
                                  f"use a .yaml file") from None
            values = tomllib.loads(text)
        else:
            raise SqlgptError(f"config file {path} must end in .yaml, .yml or .toml")
    except SqlgptError:
        raise
    except Exception as e:  # each parser has its own error types
        raise SqlgptError(f"config file {path} is malformed: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SqlgptError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
