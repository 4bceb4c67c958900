"""An imported byte-level BPE tokenizer (GPT-2's, say): a tokenizers
library definition (tokenizer.json) used as it is, with the ids and the
special tokens it has, for models imported from Hugging Face directories
(sqlgpt import). It is not built from a corpus.

Each id's exact bytes are its token's byte-level characters (the ByteLevel
alphabet), special (added) tokens have none; encode runs the library, and
never produces a special: the text "<|endoftext|>" is ordinary text.

Stored: the vocab rows hold each token's bytes; state() holds
"tokenizer_json" (the library's definition) and "specials" (JSON
{"pad", "unk", "bos", "eos"}: ids or null).
"""
import json

import numpy as np
from tokenizers import Tokenizer as Library

from ...errors import SqlgptError
from .base import Tokenizer, check_state, damaged, load_json, read_rows
from .bpe import _BYTE_OF

SPECIAL_ROLES = ("pad", "unk", "bos", "eos")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, definition, specials):
        """definition: tokenizer.json's text; specials: {role: id or None}."""
        try:
            self._lib = Library.from_str(definition)
            spec = json.loads(definition)
        except Exception as e:  # the library raises its own exception types
            raise SqlgptError(f"tokenizer.json cannot be read by the tokenizers library: "
                              f"{str(e).splitlines()[0][:200]}") from None
        if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in definition:
            raise SqlgptError("only byte-level BPE tokenizers import (GPT-2's kind); this "
                              "tokenizer.json is another kind")
        self._definition = definition
        added = {t["id"] for t in spec.get("added_tokens", [])}
        n = self._lib.get_vocab_size(with_added_tokens=True)
        raws = []
        for i in range(n):
            token = self._lib.id_to_token(i)
            if token is None:
                raise SqlgptError(f"tokenizer.json has no token for id {i} (ids must be "
                                  f"0..{n - 1})")
            if i in added:
                raws.append(None)
            elif all(c in _BYTE_OF for c in token):
                raws.append(bytes(_BYTE_OF[c] for c in token))
            else:
                raise SqlgptError(f"token {i} ({token!r}) is not byte-level BPE")
        self._names = {i: self._lib.id_to_token(i) for i in added}
        for role in SPECIAL_ROLES:
            value = specials.get(role)
            if value is not None and not (isinstance(value, int) and 0 <= value < n):
                raise SqlgptError(f"the {role} token id {value!r} is not one of the "
                                  f"tokenizer's 0..{n - 1}")
            setattr(self, f"{role}_id", value)
        self._lib.encode_special_tokens = True  # text is text, never a special
        self._set_table(raws, self._names)  # specials show as themselves: <|endoftext|>

    @classmethod
    def build(cls, texts, vocab_size):
        raise SqlgptError("the hf tokenizer comes with an imported model; it is not built from "
                          "a corpus (train with bpe)")

    @classmethod
    def from_storage(cls, rows, state):
        """Inverse of (vocab_rows(), state()), every part checked."""
        check_state(state, ("tokenizer_json", "specials"))
        specials = load_json(state, "specials")
        if not isinstance(specials, dict):
            raise damaged("its specials are not a JSON object")
        try:
            tok = cls(state["tokenizer_json"], specials)
        except SqlgptError as e:
            raise damaged(str(e)) from None
        if [raw for _, raw in read_rows(rows)] != tok._raws:
            raise damaged("its vocab rows do not match its tokenizer_json")
        return tok

    def state(self):
        return {"tokenizer_json": self._definition,
                "specials": json.dumps({r: getattr(self, f"{r}_id") for r in SPECIAL_ROLES})}

    def encode(self, text):
        return np.array(self._lib.encode(text, add_special_tokens=False).ids, dtype=np.int32)
