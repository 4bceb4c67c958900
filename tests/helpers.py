"""Shared test helpers."""
import types

import numpy as np


def rel_err(ours, ref):
    """||ours - ref|| / ||ref||, in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(ours - ref) / (denom if denom > 0 else 1.0)


def weights_bytes(db):
    """Every weight row of a database (table, keys, data, m, v, crc), for
    exact comparisons; a table the file's schema version lacks has no rows."""
    from sqlgpt import store
    conn = store.open_database(db)
    rows = [(table, *row) for table in store.weight_tables(conn)
            for row in conn.execute(store.SELECT_SQL[table])]
    conn.close()
    return rows


def query(db, sql):
    """sql's rows from db, read through a read-only connection."""
    import sqlite3
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# ---- models as store.py sees them (no kernel ops needed) ----
def standin(arch):
    """What store.py takes as a model: .arch and .params, a ParameterSet of
    the architecture's stored tensors."""
    from sqlgpt.model.arch import stored_tensors
    from sqlgpt.model.tensor import ParameterSet
    return types.SimpleNamespace(arch=arch, params=ParameterSet(stored_tensors(arch)))


def randomize(model, rng):
    """Random weights and first moments, second moments >= 0."""
    for t in model.params:
        t.data[...] = rng.standard_normal(t.shape)
        t.m[...] = rng.standard_normal(t.shape)
        t.v[...] = rng.random(t.shape)
    return model


def word_tokenizer(vocab_size):
    from sqlgpt.data.tokenizers import WordTokenizer
    return WordTokenizer(f"w{i}" for i in range(vocab_size))


def write_db(path, arch, train_cfg, seed=0, save_at=(10, 20, 30)):
    """A database as training leaves one, through store.py alone: random
    weights, the step-0 checkpoint, one checkpoint (new weights) per step in
    save_at and a metrics row per step. Returns the model last saved."""
    from sqlgpt import store
    rng = np.random.default_rng(seed)
    model = randomize(standin(arch), rng)
    state = {"step": 0, "elapsed_s": 0.0, "rng": {"seed": seed}}
    conn, lock = store.create_database(path, model, train_cfg,
                                       word_tokenizer(train_cfg.vocab_size), state)
    try:
        for step in save_at:
            store.write_metrics(conn, [(s, 3.0, train_cfg.lr, 1000.0, 1.5)
                                       for s in range(state["step"] + 1, step + 1)])
            randomize(model, rng)
            state = {**state, "step": step, "elapsed_s": step / 100}
            store.save_checkpoint(conn, model, train_cfg, state, 3.0, 3.1)
    finally:
        conn.close()
        lock.release()
    return model


def load_db(path):
    """Read a whole database as loading a model does (one snapshot, read-only):
    a namespace with arch, train_cfg, tokenizer, params, state and step."""
    from sqlgpt import store
    conn = store.open_database(path)
    try:
        with store.sqlite_errors(f"cannot read {path}"):
            conn.execute("BEGIN")
            arch, train_cfg = store.read_config(conn)
            tokenizer = store.read_tokenizer(conn, arch, train_cfg)
            model = standin(arch)
            store.read_weights(conn, model)
            state = store.read_train_state(conn)
    finally:
        conn.close()
    return types.SimpleNamespace(arch=arch, train_cfg=train_cfg, tokenizer=tokenizer,
                                 params=model.params, state=state, step=state.get("step"))


def byte_level_bpe(text, vocab_size, specials=()):
    """A byte-level BPE tokenizer as GPT-2 lays its own out (the tokenizers
    library's, trained on text): the 256 bytes first, specials last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if specials:
        tok.add_special_tokens(list(specials))
    return tok


def slowdown():
    """How much slower the kernel runs here than in a plain build: the
    sanitized CI run (AddressSanitizer preloaded) is several times slower,
    so tests that bound a time scale their bound by this."""
    import os
    return 8 if "libasan" in os.environ.get("LD_PRELOAD", "") else 1


def tiny_chat_models(folder, corpus_text, pairs, copies, base_iters, chat_iters):
    """(base, chat) databases in folder: a tiny gpt2 base trained on
    corpus_text, and its chat fine-tune on "Reverse: A B" -> "B A" for each
    pair, copies times over."""
    import json
    from click.testing import CliRunner
    from sqlgpt.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    corpus = folder / "corpus.txt"
    corpus.write_text(corpus_text)
    base, chat = folder / "base.db", folder / "talk.db"
    run("train", corpus, "--db", base, "--preset", "gpt2", "--embed-dim", "32", "--heads", "4",
        "--layers", "2", "--seq-len", "128", "--vocab-size", "300", "--iters", base_iters)
    rows = [{"prompt": f"Reverse: {a} {b}", "completion": f"{b} {a}"} for a, b in pairs]
    (folder / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * copies))
    run("train", "--chat", folder / "talk.jsonl", "--base", base, "--db", chat, "--iters",
        chat_iters)
    return base, chat
