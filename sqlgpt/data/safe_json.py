"""JSON that sqlgpt did not write itself (a Hugging Face directory's
configs, a safetensors header, a tokenizer's definition), read as untrusted:
any of it that is not plain, finite, shallow JSON is a one-line error, never
a RecursionError, an OverflowError later or an infinite size."""
import json

from ..errors import SqlgptError

MAX_DEPTH = 64  # configs and tokenizer definitions nest a few levels


def loads(text, what):
    """The value of JSON text; SqlgptError naming `what` for text that is
    not JSON, numbers that are not finite (Infinity, NaN, 1e999), or nesting
    deeper than MAX_DEPTH."""
    try:
        value = json.loads(text, parse_constant=_not_finite, parse_float=_finite)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        detail = str(e).splitlines()[0][:80] if isinstance(e, ValueError) else "nested too deep"
        raise SqlgptError(f"{what} is not valid JSON ({detail})") from None
    if depth(value) > MAX_DEPTH:
        raise SqlgptError(f"{what} is not valid JSON (nested deeper than {MAX_DEPTH})")
    return value


def depth(value, level=0):
    """How deep value's lists and objects nest (stopping past MAX_DEPTH)."""
    if level > MAX_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(
        value, list) else ()
    return max((depth(child, level + 1) for child in children), default=level)


def _not_finite(name):
    raise ValueError(f"{name} is not a number JSON has")


def _finite(text):
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value
