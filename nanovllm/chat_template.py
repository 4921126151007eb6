"""The chat-template sandbox: jinja2's immutable sandbox with the helpers Hugging Face
templates use (raise_exception, tojson, strftime_now, namespace, {% generation %}).

Templates come from model files: they are untrusted input.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            TemplateNamespace.check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace.check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# ---- bounds: a template is code from a model file, so what it may build is limited -----------

MAX_SIZE = 1 << 20  # characters of one string, or items of one list, that a template may build
MAX_OUTPUT = 4 << 20  # characters of one rendered conversation
MAX_SECONDS = 2.0  # time to render one conversation
WIDTH_METHODS = ("center", "ljust", "rjust", "zfill")


HOSTILE = "; the template in the model files is broken or hostile: pass another chat template"


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A chat template went past a bound: its message names the bound and its value."""


def _too_big(what: str, size: int) -> TemplateLimitError:
    return TemplateLimitError(
        f"the chat template would build {what} of {size:,} characters or "
        f"items, past the limit of {MAX_SIZE:,}{HOSTILE}"
    )


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, str | list | tuple) else None


def _check_width(what: str, width: Any) -> None:
    if isinstance(width, int) and width > MAX_SIZE:
        raise _too_big(what, width)


def _check_replace(text: str, old: Any, new: Any) -> None:
    if isinstance(old, str) and isinstance(new, str):
        grows = max(0, len(new) - len(old)) * (text.count(old) if old else len(text) + 1)
        if len(text) + grows > MAX_SIZE:
            raise _too_big("a replaced string", len(text) + grows)


def _check_format(spec: str) -> None:
    """Widths in str.format ({:>N}) and %-format (%Ns) specs."""
    for width in re.findall(r"(?:\{[^{}]*:[^{}\d]*|%[-+ #0]*)(\d+)", spec):
        _check_width("a formatted string", int(width))


def _check_result(what: str, value: Any) -> Any:
    size = _size(value)
    if size is not None and size > MAX_SIZE:
        raise _too_big(what, size)
    return value


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with the size of what `*`, `+`, `**`, string methods and
    filters build checked before they build it."""

    intercepted_binops = frozenset(["*", "+", "**"])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, times = (left, right) if _size(left) is not None else (right, left)
            size = _size(seq)
            if size is not None and isinstance(times, int) and size * times > MAX_SIZE:
                raise _too_big("a repeated string or list", size * times)
        elif operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_SIZE:
                raise _too_big("a concatenation", a + b)
        elif (
            operator == "**"
            and isinstance(right, int)
            and right > 64
            and isinstance(left, int | float)
            and abs(left) > 1
        ):
            raise TemplateLimitError(
                f"the chat template raises {left!r} to the power {right}, "
                f"and exponents above 64 are not allowed{HOSTILE}"
            )
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any):
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(owner)
        return super().wrap_str_format(value)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in WIDTH_METHODS and args:
                _check_width(f"a str.{name} result", args[0])
            elif name == "replace" and len(args) >= 2:
                _check_replace(owner, args[0], args[1])
            elif name == "expandtabs" and args and isinstance(args[0], int):
                _check_width("an expanded string", args[0] * owner.count("\t"))
            elif name == "join" and args:
                parts = list(args[0])
                _check_width(
                    "a joined string",
                    sum(len(p) for p in parts if isinstance(p, str)) + len(owner) * len(parts),
                )
                args = (parts, *args[1:])
        return _check_result(
            f"the result of {name or 'a call'}", super().call(__context, __obj, *args, **kwargs)
        )


def _bounded_filter(name: str, fn):
    def run(*args: Any, **kwargs: Any) -> Any:
        values = [
            a
            for a in args
            if not isinstance(a, jinja2.runtime.Context | jinja2.nodes.EvalContext | BoundedSandbox)
        ]
        if name in ("center", "indent") and len(values) > 1:
            _check_width(f"a {name} filter result", values[1])
        _check_width(f"a {name} filter result", kwargs.get("width"))
        if name == "replace" and len(values) >= 3 and isinstance(values[0], str):
            _check_replace(values[0], values[1], values[2])
        if name == "format" and values and isinstance(values[0], str):
            _check_format(values[0])
        return _check_result(f"the {name} filter's result", fn(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # keep @pass_context / @pass_environment markers
        if hasattr(fn, attr):
            setattr(run, attr, getattr(fn, attr))
    return run


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, namespace=TemplateNamespace
    )
    return env.from_string(template)


def render(template: str, **variables: Any) -> str:
    """Render within MAX_OUTPUT characters and MAX_SECONDS: a tracer on the template's own
    frames checks the clock on every line, so no loop runs past the deadline."""
    deadline = time.monotonic() + MAX_SECONDS

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(
                f"the chat template took more than {MAX_SECONDS}s to render{HOSTILE}"
            )
        return check

    def tracer(frame, event, arg):
        return check if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        out, size = [], 0
        for chunk in compile_template(template).generate(**variables):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise TemplateLimitError(
                    f"the chat template rendered more than {MAX_OUTPUT:,} characters{HOSTILE}"
                )
            out.append(chunk)
        return "".join(out)
    finally:
        sys.settrace(previous)
