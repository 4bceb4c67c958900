"""Conversations as token ids: a template's text encoded with its special
tokens as their own ids, the assistant's tokens marked (the only ones a
chat fine-tune learns), and the id a reply ends at.

Special tokens: a tokenizer's encode never produces one (text is text), so
the rendered text is cut at each special's text first (longest first, as
the tokenizers library matches added tokens) and the parts between are
encoded as text. The assistant's parts are encoded on their own too, so
each token is wholly the assistant's or not: their spans come from the
template's {% generation %} blocks, or else from rendering the
conversation one assistant turn at a time (what the prompt for that turn
was, and what the turn added to it).
"""
import re

import numpy as np

from ..errors import SqlgptError
from .template import DEFAULT_TEMPLATE, check_messages, render

ROLE_NAMES = ("pad", "unk", "bos", "eos")


def special_texts(tokenizer):
    """{text: id} of the tokenizer's special tokens (those without bytes)."""
    return {text: i for i, (_, text, raw) in enumerate(tokenizer.vocab_rows()) if raw is None}


def template_specials(tokenizer):
    """The special token texts a template reads, as transformers passes them
    (bos_token, eos_token, unk_token, pad_token; "" where there is none)."""
    pieces = tokenizer.pieces
    return {f"{role}_token": (pieces([i])[0] if i is not None else "")
            for role in ROLE_NAMES for i in [getattr(tokenizer, f"{role}_id")]}


class ChatFormat:
    """A model's template with its tokenizer: renders and encodes
    conversations, and knows the id a reply ends at."""

    def __init__(self, tokenizer, template=None):
        self.tokenizer = tokenizer
        self.template = template or DEFAULT_TEMPLATE
        if self.template == DEFAULT_TEMPLATE and None in (tokenizer.bos_id, tokenizer.eos_id):
            raise SqlgptError(f"the {tokenizer.kind} tokenizer has no <bos> and <eos> for "
                              f"sqlgpt's chat template: give the model a template of its own "
                              f"(--chat-template)")
        self.specials = special_texts(tokenizer)
        self._split = re.compile("(" + "|".join(
            re.escape(t) for t in sorted(self.specials, key=len, reverse=True)) + ")") \
            if self.specials else None
        self.end_id = self._end_id()

    def render(self, messages, add_generation_prompt=False):
        return render(self.template, messages, template_specials(self.tokenizer),
                      add_generation_prompt)

    def encode_text(self, text):
        """text's ids, each special token's text as its id."""
        parts = self._split.split(text) if self._split else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.tokenizer.encode(part).tolist())
        return ids

    def prompt(self, messages):
        """The ids that prompt the assistant's next reply."""
        text, _ = self.render(messages, add_generation_prompt=True)
        return np.array(self.encode_text(text), dtype=np.int32)

    def encode(self, messages):
        """(ids, assistant) of a whole conversation: int32 ids and a bool per
        id, true for the assistant's tokens (its replies and their ends)."""
        text, spans = self.render(messages)
        if not spans and any(m["role"] == "assistant" for m in check_messages(messages)):
            spans = self._turn_spans(messages, text)
        ids, mask, at = [], [], 0
        for start, end in sorted(spans):
            if start < at:
                raise SqlgptError("the chat template's assistant parts overlap")
            for part, scored in ((text[at:start], False), (text[start:end], True)):
                part_ids = self.encode_text(part)
                ids += part_ids
                mask += [scored] * len(part_ids)
            at = end
        tail = self.encode_text(text[at:])
        return np.array(ids + tail, dtype=np.int32), np.array(mask + [False] * len(tail))

    def _turn_spans(self, messages, text):
        """The assistant's spans by rendering turn by turn: turn i is what
        rendering messages[:i + 1] adds to the prompt for it."""
        spans = []
        messages = check_messages(messages)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, _ = self.render(messages[:i], add_generation_prompt=True) if i else ("", [])
            through, _ = self.render(messages[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise SqlgptError("the chat template renders earlier turns differently as the "
                                  "conversation grows, so the assistant's tokens cannot be told "
                                  "apart: mark them with {% generation %} blocks")
            spans.append((len(before), len(through)))
        return spans

    def _end_id(self):
        """The special token right after an assistant reply's text (<eos>,
        <|im_end|>, <|eot_id|>...), else the tokenizer's eos."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}]
        try:
            text, _ = self.render(probe)
        except SqlgptError:
            return self.tokenizer.eos_id
        after = text[text.rfind("\x00") + 1:]
        found = self._split.match(after.lstrip(" ")) if self._split else None
        return self.specials[found.group(0)] if found else self.tokenizer.eos_id
