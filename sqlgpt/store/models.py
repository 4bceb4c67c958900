"""A model's database as a whole: where a new one may go, and reading one
back (config, tokenizer, a fine-tune's base, the weights of a checkpoint)
in one snapshot."""
import contextlib
import os

from ..errors import SqlgptError
from ..model.arch import language_model, stored_tensors, tensor_table
from ..model.config import from_rows
from ..model.lora import LoraConfig, base_digest, base_path, merge_check
from ..model.model import GPT
from .connection import check_writable, is_sqlgpt_file, sqlite_errors
from .database import has_model, kept_steps, read_kept_weights
from .migrations import open_database
from .rows import (check_fits, integer_sets, read_config, read_formats, read_tensor,
                   read_tokenizer, read_train_state, read_weights)


@contextlib.contextmanager
def snapshot(path, prefix=""):
    """A read-only connection to the database at path inside one read
    transaction (a trainer may commit while we read), SQLite's errors as
    SqlgptError; closed on leaving."""
    conn = open_database(path, readonly=True, prefix=prefix)
    try:
        with sqlite_errors(f"cannot read {path}"):
            conn.execute("BEGIN")
            yield conn
    finally:
        conn.close()


def check_new_location(db_path, overwrite, prefix, resumable=True):
    """Where a new model goes: a new file (or, with overwrite, a sqlgpt
    file), or with a prefix an app's database without a model of that prefix
    (or, with overwrite, with one). resumable: whether the command that
    writes it can --resume (train can, import cannot), for the advice."""
    resume = "--resume to continue training it or " if resumable else ""
    if db_path.is_dir():
        raise SqlgptError(f"{db_path} is a directory; --db names the database file")
    if db_path.exists() and not db_path.is_file():
        raise SqlgptError(f"{db_path} is not a file")
    if prefix:
        if has_model(db_path, prefix) and not overwrite:
            raise SqlgptError(f"{db_path} already holds a model with the prefix {prefix!r}; use "
                              f"{resume}--overwrite to replace it")
    elif db_path.exists() and not overwrite:
        raise SqlgptError(f"{db_path} already exists; use {resume}--overwrite to replace it "
                          f"(or --prefix to add a model to an app's database)")
    elif db_path.exists() and not is_sqlgpt_file(db_path):
        raise SqlgptError(f"refusing to overwrite {db_path}: it is not a sqlgpt database")
    check_writable(db_path)


def read_checkpoint(conn, path, step=None, lazy=False):
    """(gpt, train config, tokenizer, step, training state) of the database
    on conn (inside a snapshot): the latest checkpoint, or with step an older
    one that `train --keep` kept; a fine-tune's GPT with its base's weights.
    lazy=True leaves the weights of a file that never changes (weights_fixed)
    unread (zero pages that take no memory until written): read them later
    through a LaterRead."""
    arch, cfg = read_config(conn)
    tokenizer = read_tokenizer(conn, arch, cfg)
    gpt = model_for(conn, path, arch, training=False)  # to run, or to copy into a new model
    state = read_train_state(conn)
    latest = state.get("step")
    if not isinstance(latest, int) or latest < 0:
        raise SqlgptError(f"{path} is damaged: no valid training step")
    if step is None or step == latest:
        if not (lazy and weights_fixed(state)):
            read_weights(conn, gpt)
        step = latest
    else:
        kept = kept_steps(conn)
        if step not in kept:
            raise SqlgptError(f"{path} keeps no checkpoint at step {step} (kept: "
                              f"{', '.join(map(str, kept)) or 'none'}; latest: {latest}"
                              f"); train with --keep N to keep older ones")
        read_kept_weights(conn, gpt, step)
    return gpt, cfg, tokenizer, step, state


def read_lora(conn):
    """The LoraConfig in a database's config table, or None (a plain model)."""
    with sqlite_errors("cannot read the config table"):
        values = dict(conn.execute("SELECT key, value FROM config"))
    try:
        return LoraConfig.from_rows(values)
    except SqlgptError as e:
        raise SqlgptError(f"the stored LoRA settings are invalid: {e}") from None


def fill_base(model, tuned_path):
    """Read a fine-tune's base weights into model.base, refusing a base that
    is missing, of another architecture, or not the weights it was tuned on."""
    path = base_path(model.lora, tuned_path)
    if not path.is_file():
        raise SqlgptError(f"the base model of {tuned_path}, {path}, is missing (the fine-tune "
                          f"names it relative to its own directory: keep the two together)")
    conn = open_database(path, readonly=True)
    try:
        with sqlite_errors(f"cannot read the base model {path}"):
            conn.execute("BEGIN")
            if read_lora(conn) is not None:
                raise SqlgptError(f"the base model {path} is itself a LoRA fine-tune")
            base_arch, _ = from_rows(dict(conn.execute("SELECT key, value FROM config")))
            tuned = language_model(model.arch)  # a classifier's base has no head
            merge_check(tuned, base_arch)
            check_fits(conn, tuned)
            plain = GPT(tuned, training=False)
            read_weights(conn, plain)
    finally:
        conn.close()
    if base_digest(plain.params) != model.lora.base_sha256:
        raise SqlgptError(f"the base model {path} has changed since {tuned_path} was tuned on "
                          f"it (its weights differ): restore that base, or fine-tune again")
    for t in model.base:
        t.data[...] = plain.params[t.name].data


def model_for(conn, db_path, arch, checkpoint_activations=False, training=True):
    """An empty GPT for the database on conn: plain, or for a fine-tune its
    adapters' GPT with the base's weights already read (the caller then
    reads the database's own weights). training=False: weights alone (no
    gradients, no optimizer moments), to run the model."""
    lora = read_lora(conn)
    if lora is None:  # a fine-tune's file holds its adapters, its base file the rest
        check_fits(conn, arch)
    model = GPT(arch, checkpoint_activations, lora, training=training)
    if lora is not None:
        fill_base(model, db_path)
    return model


def weights_fixed(state):
    """Whether a file's weights never change (by its training state): an
    import's or a compacted copy's, which no training resumes into."""
    return bool(state.get("imported_from") or state.get("compacted"))


def _identity(conn, path):
    """What tells one model at path from another put there since: the file,
    and the time its latest checkpoint was written."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SqlgptError(f"cannot read {path}: {e.strerror}") from None
    with sqlite_errors(f"cannot read {path}"):
        written = conn.execute("SELECT step, created_at FROM checkpoints ORDER BY step DESC "
                               "LIMIT 1").fetchone()
    return st.st_dev, st.st_ino, written


class LaterRead:
    """Where a loaded model's weights are, to read them when first needed
    (a generation reads only what its decoder keeps): only a file whose
    weights never change (weights_fixed) is read so. Each read is a new
    snapshot, refused if another model was put at the path since."""

    def __init__(self, conn, path, prefix):
        self.path, self.prefix = path, prefix
        self.identity = _identity(conn, path)

    @contextlib.contextmanager
    def snapshot(self):
        with snapshot(self.path, self.prefix) as conn:
            if _identity(conn, self.path) != self.identity:
                raise SqlgptError(f"{self.path} holds another model than the one loaded "
                                  f"from it: load it again")
            yield conn

    def into(self, gpt):
        """Read the weights into gpt's parameters."""
        with self.snapshot() as conn:
            read_weights(conn, gpt)


class StoredTensors:
    """{name: float32 array} of the latest weights on conn, each tensor read
    when it is asked for (inside the caller's snapshot), so a decoder built
    from it never holds more than its own copy and the tensor in hand. The
    tensors others are tied to are read once."""

    def __init__(self, conn, arch):
        self.conn, self.arch, self.formats = conn, arch, read_formats(conn, arch)
        self.sets = integer_sets(conn, self.formats)
        self.specs = {spec.name: spec for spec in stored_tensors(arch)}
        self.shared = {spec.tied_to for spec in tensor_table(arch) if spec.tied_to}
        self.kept = {}

    def held_by_head(self, precision):
        """Whether a tied head decoded in precision holds wte exactly because
        wte is stored in that very format (an import's): then wte need not
        be read at all."""
        tied = self.shared & {"wte"}
        return bool(tied) and self.formats.get("wte") == precision

    def halves(self, name):
        """name's values as float16 where it is stored in f16 (an F16
        import's) and not already read in float32, else None: a decoder packs
        them straight into its panels, with no float32 copy."""
        if self.formats.get(name) != "f16" or name in self.kept:
            return None
        return read_tensor(self.conn, self.arch, self.specs[name], self.formats, self.sets,
                           halves=True)

    def __getitem__(self, name):
        if name in self.kept:
            return self.kept[name]
        data = read_tensor(self.conn, self.arch, self.specs[name], self.formats, self.sets)
        if name in self.shared:
            self.kept[name] = data
        return data
