"""The tokenized corpus: tokenized once, streaming, into a file of token ids
beside the database (`model.db.tokens`: little-endian uint16, or uint32 for
vocabularies over 65,536), which training memory-maps. The database names the
file and records its size and SHA-256 in train_state, so a resume refuses a
missing or changed one instead of training on other data.
"""
import os
from pathlib import Path

import numpy as np

from .corpus import corpus_chunks, documents, file_sha256
from ..errors import SqlgptError

TOKENS_SUFFIX = ".tokens"
VAL_TOKENS_SUFFIX = ".val.tokens"  # --val-file's held-out text
VAL_FRACTION = 0.1      # the corpus tail held out for validation loss


def tokens_path(db_path, suffix=TOKENS_SUFFIX, prefix=""):
    """The token file beside a database (app.db.gpt_tokens for the model
    with the prefix gpt_ inside app.db)."""
    return Path(f"{db_path}.{prefix}{suffix[1:]}")


TOKEN_DTYPES = ("<u2", "<u4")  # what a token file's ids are stored as
FLAG_DTYPE = "|u1"  # a byte per id (a chat corpus's flags: sqlgpt.chat.data)


def token_dtype(n_ids):
    return TOKEN_DTYPES[0] if n_ids <= 2**16 else TOKEN_DTYPES[1]


def build_tokenizer(kind, sources, vocab_size, errors, on_bytes=None):
    """A tokenizer of this kind trained on the corpus (one streaming pass)."""
    from .tokenizers import TOKENIZERS
    has_text = [False]

    def chunks():
        for _, chunk in corpus_chunks(sources, errors, on_bytes):
            has_text[0] = has_text[0] or not chunk.isspace()
            yield chunk
    texts = chunks()
    tokenizer = TOKENIZERS[kind].build(texts, vocab_size)
    for _ in texts:  # a tokenizer that needs no corpus (byte) left it unread: check it too
        pass
    if not has_text[0]:
        names = ", ".join(s.name for s in sources)
        raise SqlgptError(f"corpus {names} is empty (nothing but whitespace)")
    return tokenizer


def write_tokens(sources, tokenizer, path, errors, on_bytes=None, counts=None):
    """Encode every source into path (created afresh), documents separated
    by <eos> where the tokenizer has one; returns the file's description
    for train_state: name, dtype, count, bytes and SHA-256. counts (n_ids
    int64s), if given, gains each id's occurrences."""
    dtype = np.dtype(token_dtype(tokenizer.n_ids))
    separator = (np.array([tokenizer.eos_id], dtype).tobytes()
                 if tokenizer.eos_id is not None else b"")
    count = 0
    with open(path, "wb") as f:
        for index, document in enumerate(documents(sources, errors, on_bytes)):
            if index and separator:
                f.write(separator)
                count += 1
                if counts is not None:
                    counts[tokenizer.eos_id] += 1
            for ids in tokenizer.encode_chunks(document):
                ids = np.asarray(ids, dtype)
                f.write(ids.tobytes())
                count += len(ids)
                if counts is not None:
                    counts += np.bincount(ids, minlength=len(counts))[:len(counts)]
        f.flush()
        os.fsync(f.fileno())
    if count == 0:
        raise SqlgptError("the corpus has no tokens (it is empty or has no words)")
    return {"file": Path(path).name, "dtype": dtype.str, "count": count,
            "bytes": count * dtype.itemsize, "sha256": file_sha256(path)}


def open_tokens(db_path, info, verify=True):
    """The token ids of a database's corpus, memory-mapped, after checking
    the file is the one the database recorded."""
    if not _sound_record(info):
        raise SqlgptError(f"{db_path} is damaged: its token file's record is not a file name "
                          f"beside it with its size, count, type and checksum "
                          f"({str(info)[:80]})")
    path = Path(db_path).parent / info["file"]  # beside the database, never anywhere else
    if not path.is_file():
        raise SqlgptError(f"the tokenized corpus {path} is missing; it was written beside "
                          f"{db_path} when training began: name the corpus again to rebuild it "
                          f"(sqlgpt train CORPUS... --db {db_path} --resume)")
    if path.stat().st_size != info["bytes"] or (verify and file_sha256(path) != info["sha256"]):
        raise SqlgptError(f"the tokenized corpus {path} has changed since {db_path} was "
                          f"trained on it; refusing to resume on other data")
    return np.memmap(path, dtype=np.dtype(info["dtype"]), mode="r", shape=(info["count"],))


def _sound_record(info):
    """Whether a token file's record (write_tokens's) is whole: a plain file
    name (no directory: it is always beside its database), and the size,
    count, id type and SHA-256 it had."""
    if not isinstance(info, dict):
        return False
    name = info.get("file")
    return (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
            and info.get("dtype") in (*TOKEN_DTYPES, FLAG_DTYPE) and isinstance(info.get("sha256"), str)
            and all(isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                    and info[k] >= 0 for k in ("count", "bytes"))
            and info["bytes"] == info["count"] * np.dtype(info["dtype"]).itemsize)


def split_tokens(tokens, seq_len, val_fraction=VAL_FRACTION):
    """(train, val) token arrays; val is the corpus tail when it is long enough."""
    n_val = int(len(tokens) * val_fraction)
    if n_val < seq_len + 1:
        n_val = 0
    train = tokens[:len(tokens) - n_val]
    if len(train) < seq_len + 1:
        raise SqlgptError(f"the corpus has {len(tokens)} tokens, too few for seq_len {seq_len} "
                          f"(need at least {seq_len + 1}); use a longer corpus or a smaller "
                          f"--seq-len")
    return train, tokens[len(train):]
