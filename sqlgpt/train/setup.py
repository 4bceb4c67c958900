"""How a Trainer comes to be: a new model (its tokenizer built, the corpus
tokenized once into a file beside the database, the step-0 checkpoint
written) or a resumed one, every stored setting and token file checked.
Trainer (trainer.py) inherits these constructors."""
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import store
from ..data.corpus import find_sources, fingerprint, remove_spools
from ..chat.conversation import ChatFormat
from ..chat.data import FLAGS_SUFFIX, ChatTokens, write_chat_tokens
from ..chat.template import DEFAULT_TEMPLATE
from ..data.corpus import SqlSource, file_sha256
from ..data.dataset import (FLAG_DTYPE, TOKENS_SUFFIX, VAL_TOKENS_SUFFIX, build_tokenizer,
                            open_tokens, split_tokens, token_dtype, tokens_path, write_tokens)
from ..errors import AlreadyTrained, SqlgptError
from ..model.config import RESUMABLE
from ..model.lora import base_digest, base_reference, merged
from ..model.model import GPT


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
    kv_heads, head_size and ffn_dim compare by what they mean (0: the default) in arch."""
    def same(field, value):
        if field == "val_file":
            return Path(value).resolve() == Path(stored[field]).resolve()
        if field in ("kv_heads", "head_size", "ffn_dim"):
            other = replace(arch, **{field: value})
            return (other.n_kv_heads, other.head_dim, other.hidden_dim) == \
                (arch.n_kv_heads, arch.head_dim, arch.hidden_dim)
        return stored.get(field) == value
    changed = [f"{option} {value} (stored: {stored.get(field, 'none')})"
               for field, (option, value) in settings.items() if not same(field, value)]
    if changed:
        raise SqlgptError(f"{keeper}; these differ from it: " + ", ".join(changed))


def _apply_changes(cfg, state, changes):
    """A resumed run's new training settings ({field: (option, old, new)})
    into cfg, and into train_state's setting_changes with the step they take
    effect from (saved with the next checkpoint, as the config is). Returns
    them in words, for the user ("--lr 0.002 (was 0.001)")."""
    if not changes:
        return []
    for field, (_, _, value) in changes.items():
        setattr(cfg, field, value)
    cfg.validate()
    history = state.get("setting_changes")
    state["setting_changes"] = (history if isinstance(history, list) else []) + [
        {"step": state["step"] + 1,
         **{field: {"was": old, "now": new} for field, (_, old, new) in changes.items()}}]
    return [f"{option} {new} (was {old})" for option, old, new in changes.values()]


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
    absolute path ("-" for standard input) and size in bytes; a query's
    text, the database it read and its rows."""
    return [{"sql": source.query, "from": str(Path(source.path).resolve()),
             "rows": sum(1 for _ in source.rows())} if isinstance(source, SqlSource) else
            {"path": source.name if source.name == "-" else str(Path(source.path).resolve()),
             "bytes": source.size} for source in sources]


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


def _check_chat(chat, corpus, init_from, cfg, chat_template):
    if chat is None:
        if chat_template is not None:
            raise SqlgptError("--chat-template goes with --chat (the conversations it renders)")
        return
    if corpus:
        raise SqlgptError("--chat names the conversations to fine-tune on: give no corpus too")
    if not init_from:
        raise SqlgptError("--chat fine-tunes a model: name it with --base (or --init-from)")
    if cfg.val_file:
        raise SqlgptError("--val-file is text; a chat fine-tune holds out --val-fraction of "
                          "its conversations")


def _chat_source(chat):
    """A chat fine-tune's conversations as a corpus source (a file, or a query)."""
    return chat if isinstance(chat, SqlSource) else find_sources([chat])[0]


def _chat_tokens(path, chat, seq_len, val_fraction, ids_path, flags_path, counts):
    """(ids record, chat record, train, held-out) of a JSON Lines file of
    conversations encoded into ids_path and flags_path; counts gains each
    id's occurrences."""
    dtype = np.dtype(token_dtype(chat.tokenizer.n_ids))
    made = write_chat_tokens(path, ids_path, flags_path, chat, seq_len, dtype)
    ids = np.memmap(ids_path, dtype=dtype, mode="r")
    flags = np.memmap(flags_path, dtype=np.uint8, mode="r")
    counts += np.bincount(ids, minlength=len(counts))[:len(counts)]
    info = {"file": "", "dtype": dtype.str, "count": len(ids), "bytes": ids.nbytes,
            "sha256": file_sha256(ids_path)}
    flag_info = {"file": "", "dtype": FLAG_DTYPE, "count": len(flags), "bytes": flags.nbytes,
                 "sha256": file_sha256(flags_path)}
    train, val = ChatTokens(ids, flags, chat.tokenizer.eos_id).split(val_fraction)
    return info, {"flags": flag_info, **asdict(made)}, train, val


def _resume_chat(db_path, state, tokenizer):
    """A chat fine-tune's conversations from the files it recorded."""
    for key, info in (("tokens", state.get("tokens")), ("flags", state["chat"].get("flags"))):
        if not isinstance(info, dict) or not (Path(db_path).parent / str(info.get("file"))
                                              ).is_file():
            raise SqlgptError(f"the chat token files of {db_path} are missing: fine-tune on "
                              f"the conversations again into a new --db")
    return ChatTokens(open_tokens(db_path, state["tokens"]),
                      open_tokens(db_path, state["chat"]["flags"]), tokenizer.eos_id)


class TrainerSetup:
    """Trainer's constructors: create (a new model) and resume."""

    # ---- construction ----
    @classmethod
    def create(cls, db_path, corpus, arch, cfg, overwrite=False, extensions=(),
               encoding_errors="strict", on_progress=None, init_from=None, settings=None,
               prefix="", lora=None, chat=None, chat_template=None):
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
        whose database holds only the adapters and names its base. chat: a
        JSON Lines file of conversations to fine-tune on instead of a corpus
        (the loss on the assistant's tokens alone; sqlgpt.chat.data), rendered
        by chat_template (a template's text), else the base's own template,
        else sqlgpt's default."""
        db_path = Path(db_path)
        store.check_new_location(db_path, overwrite, store.check_prefix(prefix))
        if lora is not None and not init_from:
            raise SqlgptError("a LoRA fine-tune needs the model it adapts: --base BASE.db")
        _check_chat(chat, corpus, init_from, cfg, chat_template)
        cfg.validate()
        arch.validate()
        sources = find_sources(corpus, extensions, spool_dir=db_path.parent) if chat is None \
            else []
        template = chat_template
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
                    base, base_cfg, base_tokenizer, _, base_state = store.read_checkpoint(
                        conn, init_from)
                template = template or base_state.get("chat_template")
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
            val_info = chat_record = None
            if chat is not None:  # the flags file goes where --val-file's would
                info, chat_record, train, val = _chat_tokens(
                    chat, ChatFormat(tokenizer, template or DEFAULT_TEMPLATE), arch.seq_len,
                    cfg.val_fraction, tmp_tokens, tmp_val, counts)
                chat_record["flags"]["file"] = tokens_path(db_path, FLAGS_SUFFIX, prefix).name
            else:
                info = write_tokens(sources, tokenizer, tmp_tokens, encoding_errors,
                                    _progress(on_progress, "tokenizing", sources), counts)
                tokens = np.memmap(tmp_tokens, dtype=np.dtype(info["dtype"]), mode="r")
                train, val = split_tokens(tokens, arch.seq_len, cfg.val_fraction)
            info["file"] = tokens_path(db_path, prefix=prefix).name
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
                     "corpus_sha256": fingerprint(sources or [_chat_source(chat)]),
                     "tokens": info, "corpus": corpus_record(sources or [_chat_source(chat)]),
                     "elapsed_s": 0.0, "bad_steps": 0, "tokens_seen": 0}
            if val_info:
                state["val_tokens"] = val_info
            if chat_record:
                state["chat"] = chat_record
            if template:
                state["chat_template"] = template
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
                if chat_record:
                    os.replace(tmp_val, tokens_path(db_path, FLAGS_SUFFIX, prefix))
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
                    *parts, changed = parts
                    step = parts[-1]["step"]
                    if max_iters is not None and step >= max_iters:
                        history = store.checkpoints(reader)
                        raise AlreadyTrained(step, history[-1]["train_loss"]
                                             if history else None)
                with store.sqlite_errors(f"cannot open {db_path} for training"):
                    # migrates an old file
                    conn = store.open_database(db_path, readonly=False, prefix=prefix)
                trainer = cls(conn, lock, *parts)
                trainer.changed_settings = changed  # "--lr 0.002 (was 0.001)", for the user
                return trainer
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
        """(model, cfg, tokenizer, train, val, state, the settings it changes
        in words) of a database to resume, every part checked."""
        arch, cfg = store.read_config(conn)
        lora = store.read_lora(conn)
        stored = {**cfg.to_dict(), **arch.to_dict(), **dict(lora.rows() if lora else [])}
        settings = settings or {}
        changes = {field: (option, stored[field], value)
                   for field, (option, value) in settings.items()
                   if field in RESUMABLE and stored.get(field) != value}
        _check_unchanged({f: v for f, v in settings.items() if f not in changes}, stored, arch,
                         "--resume keeps the model, its tokenizer and its data (to change "
                         "them, start a new model from this one with --init-from)")
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
                              f"{db_path} was trained on; resume needs the same files (or "
                              f"rows)")
        if state.get("chat"):
            if sources:
                raise SqlgptError(f"{db_path} is a chat fine-tune: resume it without a corpus")
            tokens = _resume_chat(db_path, state, tokenizer)
        else:
            tokens = _resume_tokens(db_path, conn.prefix, state, "corpus", tokenizer, sources,
                                    encoding_errors, on_progress)
        for name, value in (run_options or {}).items():  # memory or messages, not results
            setattr(cfg, name, value)
        changed = _apply_changes(cfg, state, changes)
        model = store.model_for(conn, db_path, arch, cfg.checkpoint_activations)
        store.read_weights(conn, model)
        train, val = tokens.split(cfg.val_fraction) if isinstance(tokens, ChatTokens) else \
            split_tokens(tokens, arch.seq_len, cfg.val_fraction)
        if cfg.val_file:
            val_sources = (_val_sources(cfg.val_file, Path(db_path).parent)
                           if Path(cfg.val_file).is_file() else [])
            val = _val_split(_resume_tokens(db_path, conn.prefix, state, "val", tokenizer,
                                            val_sources, encoding_errors, on_progress),
                             arch.seq_len, cfg.val_file)
        return model, cfg, tokenizer, train, val, state, changed
