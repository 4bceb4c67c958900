"""Conversations to fine-tune on: JSON Lines read and checked row by row,
encoded once into two files beside the database, and drawn as batches
whose loss counts the assistant's tokens alone.

A row is {"messages": [{"role", "content"}, ...]} (roles system, user,
assistant) or {"prompt": ..., "completion": ...} (one user turn and its
reply). The ids of every conversation go one after another into the
model's token file (`model.db.tokens`, as a text corpus's do); a second
file (`model.db.chat`) holds a byte per id: SCORED where the id is the
assistant's (a target the loss counts), START where a conversation begins.
A training row is one conversation from its start, padded past its end
with targets the loss skips; a conversation longer than the context is cut
after its last assistant turn that fits (one whose first reply does not
fit is left out), and both are counted for the user.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.corpus import SqlSource
from ..errors import SqlgptError
from ..model.model import IGNORE
from .template import check_messages

SCORED, START = 1, 2
FLAGS_SUFFIX = ".chat"
MAX_LINE_CHARS = 1 << 24


def read_conversations(path):
    """Yield (line number, messages) of a JSON Lines file, each row checked
    (blank lines skipped); a bad row is a one-line error naming its line. A
    SqlSource's rows instead: each a JSON messages array or row object."""
    if isinstance(path, SqlSource):
        for number, text in enumerate(path.rows(), 1):
            if text.lstrip().startswith("["):
                text = '{"messages": ' + text + "}"
            yield number, _messages(text, f"--sql row {number}")
        return
    path = Path(path)
    if not path.is_file():
        raise SqlgptError(f"{path} is not a file of conversations (JSON Lines)")
    with open(path, encoding="utf-8", errors="strict") as f:
        number = 0
        while True:
            number += 1
            try:
                line = f.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError:
                raise SqlgptError(f"{path} line {number}: not UTF-8 text") from None
            if not line:
                return
            if len(line) > MAX_LINE_CHARS:
                raise SqlgptError(f"{path} line {number}: longer than {MAX_LINE_CHARS:,} "
                                  f"characters")
            if line.strip():
                yield number, _messages(line, f"{path} line {number}")


def _messages(line, where):
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        raise SqlgptError(f"{where}: not a JSON object") from None
    if not isinstance(row, dict):
        raise SqlgptError(f"{where}: not a JSON object")
    if "messages" in row:
        messages = row["messages"]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"]}]
    else:
        raise SqlgptError(f"{where}: has neither \"messages\" nor \"prompt\" and "
                          f"\"completion\" text")
    try:
        messages = check_messages(messages)
    except SqlgptError as e:
        raise SqlgptError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise SqlgptError(f"{where}: has no assistant message to learn from")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise SqlgptError(f"{where}: an assistant message is empty")
    return messages


@dataclass
class ChatCounts:
    conversations: int = 0   # written
    cut: int = 0             # cut after their last assistant turn that fits
    dropped: int = 0         # whose first reply does not fit the context
    scored: int = 0          # assistant tokens (the targets the loss counts)


def fitted(chat, messages, limit):
    """(ids, mask, cut) of messages, or of its longest prefix ending with an
    assistant turn within limit ids (cut true); None when even the first
    reply does not fit."""
    ids, mask = chat.encode(messages)
    if len(ids) <= limit:
        return ids, mask, False
    for end in range(len(messages) - 1, 0, -1):
        if messages[end - 1]["role"] == "assistant":
            ids, mask = chat.encode(messages[:end])
            if len(ids) <= limit:
                return ids, mask, True
    return None


def write_chat_tokens(path, ids_path, flags_path, chat, seq_len, dtype):
    """Encode the conversations of path into ids_path (dtype) and
    flags_path (a byte each); the counts. Nothing is left on error."""
    counts = ChatCounts()
    try:
        with open(ids_path, "wb") as ids_file, open(flags_path, "wb") as flags_file:
            for _, messages in read_conversations(path):
                found = fitted(chat, messages, seq_len + 1)
                if found is None:
                    counts.dropped += 1
                    continue
                ids, mask, cut = found
                counts.cut += cut
                flags = np.where(mask, SCORED, 0).astype(np.uint8)
                flags[0] |= START
                ids_file.write(ids.astype(dtype).tobytes())
                flags_file.write(flags.tobytes())
                counts.conversations += 1
                counts.scored += int(mask.sum())
            for f in (ids_file, flags_file):
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for p in (ids_path, flags_path):
            Path(p).unlink(missing_ok=True)
        raise
    if counts.conversations == 0:
        raise SqlgptError(f"{path} has no conversation whose first reply fits the context of "
                          f"{seq_len} tokens" if counts.dropped else f"{path} has no "
                          f"conversations")
    return counts


class ChatTokens:
    """Conversations as (ids, flags) arrays: their training rows and the
    held-out split."""

    def __init__(self, ids, flags, eos_id):
        if len(ids) != len(flags) or not len(flags) or not flags[0] & START:
            raise SqlgptError("the chat token files do not match: encode the conversations "
                              "again (a new --db)")
        self.ids, self.flags, self.eos_id = ids, flags, eos_id
        self.starts = np.flatnonzero(np.asarray(flags) & START)
        self.ends = np.append(self.starts[1:], len(ids))

    def __len__(self):
        return len(self.starts)

    @property
    def dtype(self):
        return self.ids.dtype

    def split(self, val_fraction):
        """(train, held-out) by conversations: the last val_fraction of them
        held out (none when that is not one, or would leave none to train)."""
        n_val = int(len(self) * val_fraction)
        if n_val < 1 or n_val >= len(self):
            return self, None
        cut = self.starts[len(self) - n_val]
        return (ChatTokens(self.ids[:cut], self.flags[:cut], self.eos_id),
                ChatTokens(self.ids[cut:], self.flags[cut:], self.eos_id))

    def rows(self, which, T):
        """(x, y) (len(which), T) of conversations `which`: each from its
        start, y the next ids where the assistant's, else IGNORE; past a
        conversation's end x is eos and y IGNORE."""
        x = np.full((len(which), T), self.eos_id or 0, dtype=np.int32)
        y = np.full((len(which), T), IGNORE, dtype=np.int32)
        for row, c in enumerate(which):
            start, end = int(self.starts[c]), int(self.ends[c])
            n = min(end - start, T + 1)
            ids = np.asarray(self.ids[start:start + n], dtype=np.int32)
            scored = np.asarray(self.flags[start + 1:start + n]) & SCORED
            x[row, :n - 1] = ids[:-1]
            y[row, :n - 1] = np.where(scored, ids[1:], IGNORE)
        return x, y

    def batch(self, rng, B, T):
        """B random conversations' rows."""
        return self.rows(rng.integers(0, len(self), size=B), T)
