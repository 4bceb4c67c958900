"""OpenAI's dialect: request fields checked one by one (a bad one is a 400
naming it), and the objects the `openai` client reads back."""
import base64
import time
import uuid

import numpy as np

from ..errors import SqlgptError
from ..inference.sampling import Sampler

MAX_N = 16              # choices per request
MAX_STOPS = 4           # as OpenAI allows
MAX_TOP_LOGPROBS = 20
MAX_LIST = 256          # prompts or inputs per request
MAX_TOKENS = 1 << 20    # a request's max_tokens (what the context leaves is the real bound)


class ApiError(SqlgptError):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(param, message):
    return ApiError(400, message, param=param)


def _number(body, name, default, low, high):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not low <= value <= high:
        raise bad(name, f"{name} must be a number from {low} to {high}, got {value!r}")
    return value


def _integer(body, name, default, low, high):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(name, f"{name} must be an integer from {low} to {high:,}, got {value!r}")
    return value


def sampling(body, max_tokens_default):
    """(Sampler, max_tokens, seed, stop, n) of a request's fields (a reply
    also ends where the model's context does: finish_reason "length")."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", max_tokens_default, 0,
                          MAX_TOKENS)
    sampler = Sampler(_number(body, "temperature", 1.0, 0, 2), 0,
                      max(_number(body, "top_p", 1.0, 0, 1), 1e-9))
    seed = _integer(body, "seed", None, -2**63, 2**64 - 1)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not (isinstance(stop, list) and len(stop) <= MAX_STOPS and
              all(isinstance(s, str) for s in stop)):
        raise bad("stop", f"stop must be a string or a list of at most {MAX_STOPS} strings")
    if any(not s for s in stop):
        raise bad("stop", "a stop string must not be empty")
    n = _integer(body, "n", 1, 1, MAX_N)
    return sampler, max_tokens, None if seed is None else seed % 2**63, tuple(stop), n


def flag(body, name):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return value


def include_usage(body):
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "stream_options must be an object")
    return bool(options.get("include_usage"))


def texts_or_ids(value, name, vocab):
    """A prompt or input field as a list of items, each text or a list of
    token ids: a string, a list of strings, a list of ids, or a list of such
    lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(_is_id(v) for v in value):
        return [_ids(value, name, vocab)]
    if isinstance(value, list) and value and len(value) <= MAX_LIST and all(
            isinstance(v, str) or (isinstance(v, list) and v and all(_is_id(i) for i in v))
            for v in value):
        return [v if isinstance(v, str) else _ids(v, name, vocab) for v in value]
    raise bad(name, f"{name} must be a string, a list of strings, or token ids (a list of "
                    f"integers, or of such lists; at most {MAX_LIST})")


def _is_id(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _ids(values, name, vocab):
    if any(not 0 <= v < vocab for v in values):
        raise bad(name, f"token ids must be from 0 to {vocab - 1}")
    return list(values)


def message_text(content, index):
    """A message's content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad("messages", f"message {index} has content that is not text (a string or "
                          f"text parts)")


def messages_of(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\", \"content\"}")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise bad("messages", f"message {i} is not an object")
        out.append({"role": m.get("role"), "content": message_text(m.get("content"), i)})
    return out


def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now():
    return int(time.time())


def usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def embedding_value(vector, encoding):
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(v) for v in vector]
