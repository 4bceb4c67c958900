"""An imported BPE tokenizer: byte-level (GPT-2's, llama 3's, Qwen2's) or
SentencePiece-style with byte fallback (llama 2's, TinyLlama's,
Mistral's): a tokenizers library definition (tokenizer.json) used as it
is, with the ids and the special tokens it has, for imported models
(sqlgpt import). It is not built from a corpus.

Each id's exact bytes are its token's byte-level characters (the ByteLevel
alphabet), or its SentencePiece text ("▁" a space, <0xXX> that byte);
special (added) tokens have none; encode runs the library, and
never produces a special: the text "<|endoftext|>" is ordinary text.

Stored: the vocab rows hold each token's bytes; state() holds
"tokenizer_json" (the library's definition) and "specials" (JSON
{"pad", "unk", "bos", "eos"}: ids or null).
"""
import contextlib
import json

import numpy as np
from tokenizers import Tokenizer as Library

from ...contract import PRETOKENIZER_PATTERNS
from .. import safe_json
from ...errors import SqlgptError
from .base import Tokenizer, check_state, damaged, load_json, read_rows
from .bpe import _BYTE_OF

SPECIAL_ROLES = ("pad", "unk", "bos", "eos")


@contextlib.contextmanager
def library_errors(what):
    """The tokenizers library's errors, and its Rust panics (pyo3's
    PanicException is a BaseException, which `except Exception` misses),
    as one-line SqlgptErrors; an interrupt stays an interrupt."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: B036 (see above)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise SqlgptError(f"{what}: {first}") from None


def known_shape(definition):
    """(tokenizer.json as sqlgpt runs it, its shape): a BPE in a shape sqlgpt
    can stand behind, with its padding and truncation dropped (an encoding
    is the text's own ids, never padded to a length the file chooses).
    Shapes: "byte-level" (GPT-2's kind: no normalizer or NFC; a ByteLevel
    pre-tokenizer, alone or after a Split by one of
    contract.PRETOKENIZER_PATTERNS or a Digits step; a ByteLevel decoder)
    and "sentencepiece" (llama 2's, TinyLlama's, Mistral's: spaces as "▁",
    prepended, by a normalizer or a Metaspace pre-tokenizer; byte fallback
    to <0xXX> tokens; the decoders that undo those). Anything else is a
    one-line error naming what it is."""
    spec = safe_json.loads(definition, "tokenizer.json")
    if not isinstance(spec, dict):
        raise SqlgptError("tokenizer.json is not a tokenizer definition")
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise SqlgptError("only BPE tokenizers import (byte-level as GPT-2's, or SentencePiece's "
                          "with byte fallback as llama 2's); this tokenizer.json is another kind")
    if model.get("byte_fallback"):
        _check_sentencepiece(spec)
        shape = "sentencepiece"
    else:
        normalizer = spec.get("normalizer")
        if normalizer is not None and _kind(normalizer) != "NFC":
            raise SqlgptError(f"tokenizer.json's normalizer {_kind(normalizer)} is not one "
                              f"sqlgpt runs (none, or NFC)")
        _check_pre_tokenizer(spec.get("pre_tokenizer"))
        if _kind(spec.get("decoder")) != "ByteLevel":
            raise SqlgptError(f"tokenizer.json's decoder {_kind(spec.get('decoder'))} is not "
                              f"ByteLevel")
        shape = "byte-level"
    return {**spec, "padding": None, "truncation": None}, shape


SPACE = "\u2581"  # SentencePiece's "▁", a space in its tokens
SPM_NORMALIZER = [{"type": "Prepend", "prepend": SPACE},
                  {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
SPM_DECODERS = {"Replace", "ByteFallback", "Fuse", "Strip"}


def _check_sentencepiece(spec):
    """llama 2's shape: the normalizer prepends "▁" (or not) and turns spaces
    into it (no pre-tokenizer), or a Metaspace pre-tokenizer does (no
    normalizer);
    a decoder of Replace, ByteFallback, Fuse and Strip steps, or Metaspace."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = normalizer.get("normalizers") if _kind(normalizer) == "Sequence" else None
    by_normalizer = steps in (SPM_NORMALIZER, SPM_NORMALIZER[1:]) and pre is None
    by_metaspace = normalizer is None and _kind(pre) == "Metaspace" and \
        pre.get("replacement") == SPACE and pre.get("prepend_scheme", "always") in (
            "first", "always") and not pre.get("split", False)
    if not (by_normalizer or by_metaspace):
        raise SqlgptError(f"tokenizer.json is SentencePiece-style, but its normalizer "
                          f"{_kind(normalizer)} and pre-tokenizer {_kind(pre)} are not the ones "
                          f"sqlgpt runs (prepend and replace spaces by U+2581, or Metaspace)")
    decoder = spec.get("decoder")
    parts = decoder.get("decoders") if _kind(decoder) == "Sequence" else [decoder]
    if _kind(decoder) != "Metaspace" and not (
            isinstance(parts, list) and parts and {_kind(d) for d in parts} <= SPM_DECODERS):
        raise SqlgptError(f"tokenizer.json's decoder {_kind(decoder)} is not one sqlgpt runs "
                          f"for a SentencePiece-style tokenizer")


def _kind(part):
    return part.get("type") if isinstance(part, dict) else repr(part)


def _check_pre_tokenizer(part):
    steps = part.get("pretokenizers") if _kind(part) == "Sequence" else [part]
    if not isinstance(steps, list) or not steps or _kind(steps[-1]) != "ByteLevel":
        raise SqlgptError("tokenizer.json's pre-tokenizer does not end in ByteLevel: not a "
                          "byte-level BPE sqlgpt runs")
    for step in steps[:-1]:
        if _kind(step) == "Digits":
            continue
        if _kind(step) != "Split":
            raise SqlgptError(f"tokenizer.json's pre-tokenizer step {_kind(step)} is not one "
                              f"sqlgpt runs (Split, Digits, ByteLevel)")
        pattern = step.get("pattern") or {}
        regex = pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else None
        if regex not in PRETOKENIZER_PATTERNS.values():
            raise SqlgptError(f"tokenizer.json splits by a pattern sqlgpt does not know "
                              f"({str(regex)[:60]!r}); it runs only "
                              f"{', '.join(PRETOKENIZER_PATTERNS)}'s")


def token_bytes(token, shape, i):
    """The exact bytes a token stands for: its byte-level characters' bytes;
    for SentencePiece, its text with "▁" as a space, or the byte of a
    <0xXX> fallback token."""
    if shape == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace(SPACE, " ").encode("utf-8", "surrogatepass")
    if all(c in _BYTE_OF for c in token):
        return bytes(_BYTE_OF[c] for c in token)
    raise SqlgptError(f"token {i} ({token!r}) is not byte-level BPE")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, definition, specials):
        """definition: tokenizer.json's text; specials: {role: id or None}."""
        spec, self.shape = known_shape(definition)
        definition = json.dumps(spec, ensure_ascii=False)
        with library_errors("tokenizer.json cannot be read by the tokenizers library"):
            self._lib = Library.from_str(definition)
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
            else:
                raws.append(token_bytes(token, self.shape, i))
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
        with library_errors("the tokenizers library failed on this text"):
            ids = self._lib.encode(text, add_special_tokens=False).ids
        return np.array(ids, dtype=np.int32)
