"""Chat templates: a conversation rendered to the text a model was tuned on.

A template is Jinja2, run as transformers' apply_chat_template runs it
(a sandboxed, immutable environment with trim_blocks and lstrip_blocks,
loop controls, its tojson filter, raise_exception, strftime_now, the
`{% generation %}` tag that marks the assistant's text), so an imported
model's own template gives the same text here as in transformers. A
template is code from a file: it runs with limits (its output, the sizes
of the strings and lists it makes, and a deadline checked at each call,
attribute access and output), so a hostile one is an error, not a hang.

sqlgpt's own models get DEFAULT_TEMPLATE, written with the specials every
sqlgpt tokenizer already has: each message is <bos>, its role, a newline,
its content and <eos>; a reply is prompted by <bos>assistant and a newline
and ends at <eos>, where generation stops anyway.
"""
import json
import time
from contextvars import ContextVar
from datetime import datetime

from ..contract import CHAT_ROLES, CHAT_TEMPLATES
from ..errors import SqlgptError

# sqlgpt's own template and ChatML (Qwen2's), which the extension renders too
DEFAULT_TEMPLATE = CHAT_TEMPLATES["sqlgpt"]
CHATML_TEMPLATE = CHAT_TEMPLATES["chatml"]
ROLES = CHAT_ROLES
MAX_TEMPLATE_CHARS = 1 << 20
MAX_OUTPUT_CHARS = 1 << 24     # a rendered conversation
MAX_MADE = 1 << 20             # a string or list a template builds with * or **
RENDER_SECONDS = 10.0          # a deadline no honest template comes near

_deadline = ContextVar("chat_template_deadline", default=None)


def _check_deadline():
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise SqlgptError(f"the chat template ran past {RENDER_SECONDS:g} s (a loop that "
                          f"does not end?)")


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            _check_deadline()
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SqlgptError("the chat template raises a number to a power over 64")
            if operator == "*" and isinstance(left, (str, list, tuple)) and \
                    isinstance(right, int) and len(left) * right > MAX_MADE or \
                    operator == "*" and isinstance(right, (str, list, tuple)) and \
                    isinstance(left, int) and len(right) * left > MAX_MADE:
                raise SqlgptError("the chat template makes a string or list too long")
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, *args, **kwargs):
            _check_deadline()
            return super().call(context, obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _check_deadline()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_deadline()
            return super().getitem(obj, argument)

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: the assistant's own text,
        whose character spans the render records (transformers'
        AssistantTracker)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(
                lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _tracking.get()
            if tracking is not None:  # where the render has got to, as transformers counts
                tracking["spans"].append((tracking["size"], tracking["size"] + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):  # no underscore names: no way to internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = Limited(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt), dict=dict)
    return env


_tracking = ContextVar("chat_template_tracking", default=None)
_compiled = {}


def compile_template(source):
    """A template's compiled form (cached), or a one-line error."""
    if not isinstance(source, str) or not source.strip():
        raise SqlgptError("the chat template is empty")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise SqlgptError(f"the chat template is over {MAX_TEMPLATE_CHARS:,} characters")
    if source not in _compiled:
        import jinja2
        try:
            _compiled[source] = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise SqlgptError(f"the chat template is not valid Jinja: {_first_line(e)}") from None
        except RecursionError:
            raise SqlgptError("the chat template nests too deeply") from None
        if len(_compiled) > 16:
            _compiled.pop(next(iter(_compiled)))
    return _compiled[source]


def check_messages(messages):
    """messages as a list of {"role", "content"} dicts with known roles and
    text content, or a one-line error naming the first bad one."""
    if not isinstance(messages, list) or not messages:
        raise SqlgptError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise SqlgptError(f"message {i} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise SqlgptError(f"message {i} has role {role!r}: roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise SqlgptError(f"message {i} ({role}) has no text content")
        out.append({"role": role, "content": content})
    return out


def render(source, messages, specials, add_generation_prompt=False):
    """(text, [(start, end)] of the assistant's text): messages rendered by
    the template source, with the tokenizer's special token texts
    (bos_token, eos_token, ...) as transformers passes them. The spans are
    the {% generation %} blocks' where the template has them."""
    import jinja2
    template = compile_template(source)
    messages = check_messages(messages)
    pieces, tracking = [], {"size": 0, "spans": []}
    token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    tracking_token = _tracking.set(tracking)
    try:
        for piece in template.generate(messages=messages, add_generation_prompt=bool(
                add_generation_prompt), tools=None, documents=None, **specials):
            _check_deadline()
            pieces.append(piece)
            tracking["size"] += len(piece)
            if tracking["size"] > MAX_OUTPUT_CHARS:
                raise SqlgptError(f"the chat template's output passed {MAX_OUTPUT_CHARS:,} "
                                  f"characters")
    except jinja2.TemplateError as e:
        raise SqlgptError(f"the chat template failed: {_first_line(e)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            OverflowError) as e:
        raise SqlgptError(f"the chat template failed: {type(e).__name__}: {_first_line(e)}") \
            from None
    except RecursionError:
        raise SqlgptError("the chat template recursed too deeply") from None
    finally:
        _deadline.reset(token)
        _tracking.reset(tracking_token)
    return "".join(pieces), tracking["spans"]


def _first_line(e):
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
