"""Message templates: sandboxed Jinja2 with strict undefined, and the composed SMS text.

Templates are operator-written files, so they render in Jinja2's sandbox (no
attribute access to Python internals) with ``StrictUndefined`` (a misspelt
variable is an error, never an empty string in a message to 20,000 people).

The text a resident receives is ``signature + body + opt_out``: the signature
【…】 leads, as China's SMS rules require, and the opt-out closes awareness
messages. Every character of all three counts towards the parts billed.
"""

from __future__ import annotations

import functools
import hashlib
import re
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from .charcheck import LINE_BREAKS, bad_character
from .errors import TemplateError
from .sms import MAX_MESSAGE_CHARS, Segmentation, segment

#: names every template may use without the campaign declaring them
BUILTIN_NAMES = frozenset({"recipient", "campaign"})

#: the sample recipient validation and preview render with (the shortest real values make the
#: "can never fit" check a lower bound; preview shows the typical text)
SAMPLE_RECIPIENT = {"name": "居民", "district": "横林镇", "grid": "HL-01"}


# ------------------------------------------------------------------ a sandbox with bounded sizes

#: the most characters (or items) any value inside a template may grow to; a message is at most 500
MAX_TEMPLATE_VALUE = 20_000
#: the most characters a template may output before whitespace is collapsed
MAX_TEMPLATE_OUTPUT = 20_000
#: the most iterations all ``{% for %}`` loops of one render may run together
MAX_LOOP_ITERATIONS = 100_000
#: the largest ``**`` result, in bits (a 1,233-digit number is plenty for a message)
_MAX_BITS = 4096
#: calls whose integer argument is a width to pad to: refused above MAX_TEMPLATE_VALUE
_WIDTH_CALLS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap"})
#: a format width of five digits or more (``%99999s``, ``{:>99999}``), or one taken from the arguments
#: (``%*s``, ``{:{w}}``), which could be any size: both refused
_BIG_WIDTH_RE = re.compile(r"(%[-#0 +]*(\d{5,}|\*))|(\{[^{}]*:[^{}]*(\d{5,}|\{))")

#: iterations left to the render in progress (None outside ``Composer.body``: no budget)
_LOOP_BUDGET: ContextVar[list[int] | None] = ContextVar("template_loop_budget", default=None)


class TemplateTooLarge(SecurityError):
    """A template that would build a value or an output beyond the bounds above."""


def _too_long(what: str = "output") -> TemplateTooLarge:
    return TemplateTooLarge(f"{what} too long (a message is at most {MAX_MESSAGE_CHARS} characters)")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple | bytes | dict | set) and len(value) > MAX_TEMPLATE_VALUE:
        raise _too_long()
    return value


def _check_format(fmt: Any) -> None:
    """Refuse format strings whose padding alone would make a huge string."""
    if isinstance(fmt, str) and _BIG_WIDTH_RE.search(fmt):
        raise _too_long()


def _check_builder(name: str, subject: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Estimate, before it runs, the size of what a string method or filter ``name`` would build."""
    if name in _WIDTH_CALLS and any(isinstance(v, int) and v > MAX_TEMPLATE_VALUE for v in [*args, *kwargs.values()]):
        raise _too_long()
    if name in ("format", "format_map"):
        _check_format(subject)
    elif name == "replace" and isinstance(subject, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        count = subject.count(old) if old else len(subject) + 1
        if len(subject) + count * len(new) > MAX_TEMPLATE_VALUE:
            raise _too_long()
    elif name == "join" and isinstance(subject, list | tuple):
        sep = args[0] if args else kwargs.get("d", "")
        if sum(len(str(x)) for x in subject) + len(str(sep)) * len(subject) > MAX_TEMPLATE_VALUE:
            raise _too_long()


def _bounded_filter(name: str, func: Any) -> Any:
    """Filter ``name`` refusing to build a value beyond the bounds (jinja's own filters included)."""

    @functools.wraps(func)  # keeps jinja's pass_context/pass_eval_context marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if not isinstance(a, Context | EvalContext | jinja2.Environment)]
        if values:
            _check_builder(name, values[0], values[1:], kwargs)
        return _check_size(func(*args, **kwargs))

    return wrapper


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sized = str | list | tuple
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(times, int) and len(seq) * times > MAX_TEMPLATE_VALUE:
                raise _too_long()
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        if len(left) + len(right) > MAX_TEMPLATE_VALUE:
            raise _too_long()
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right * abs(left).bit_length() > _MAX_BITS:
            raise TemplateTooLarge("number too large")
    elif operator == "%":
        _check_format(left)


def _loop_budget(iterable: Any) -> Any:
    """Count every loop iteration of the render against one budget: nested loops cannot multiply unchecked."""
    budget = _LOOP_BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget[0] -= 1
            if budget[0] < 0:
                raise TemplateTooLarge(f"loops run more than {MAX_LOOP_ITERATIONS} times in one message")
        yield item


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # ``a ~ b`` is compiled to a plain join, out of the sandbox's reach: route it through a size check
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(SandboxedEnvironment):
    """Jinja2's sandbox that also bounds sizes: operator-written templates cannot take gigabytes.

    ``"a" * 300000000``, a doubling loop or ``center(10**9)`` would otherwise build the value
    before anything could look at it: repetition, concatenation, powers, padding, ``replace``
    and ``join`` are checked before they run, every filter's and call's result after, loops
    share one iteration budget per render, and ``Composer.body`` stops reading the output
    past ``MAX_TEMPLATE_OUTPUT``.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["loop_budget"] = _loop_budget

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "loop_budget", [], [], None, None, lineno=loop.lineno)
        return tree

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        try:
            return _check_size(super().call_binop(context, operator, left, right))
        except OverflowError as exc:
            raise TemplateTooLarge("number too large") from exc

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str | list | tuple):  # a method of a value: "x".center(9), ",".join(items)
            name = getattr(target, "__name__", "")
            if name == "join" and args:
                _check_builder(name, args[0], [owner], {})
            else:
                _check_builder(name, owner, list(args), kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    @staticmethod
    def bounded_concat(parts: Iterable[Any]) -> str:
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > MAX_TEMPLATE_VALUE:
            raise _too_long()
        return "".join(texts)


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at (jinja rewrites tracebacks to template lines)."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return lines[-1] if lines else None


def _output_line(template: jinja2.Template, output: Any) -> int | None:
    """The template line a suspended render stopped at: where the output that went past the bound came from."""
    frame = None
    while output is not None and getattr(output, "gi_frame", None) is not None:
        frame = output.gi_frame
        output = getattr(output, "gi_yieldfrom", None)
    return template.get_corresponding_lineno(frame.f_lineno) if frame is not None else None


def _environment() -> SandboxedEnvironment:
    return BoundedSandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # SMS is plain text; HTML escaping would corrupt it
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


_ENV = _environment()


@dataclass(frozen=True)
class TemplateSource:
    """A template file's text and where it came from, as snapshotted into a run."""

    name: str  # path relative to the templates folder, as written in the campaign
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load(templates_dir: Path, name: str) -> TemplateSource:
    shown = name if len(name) <= 80 else f"{name[:60]}… ({len(name)} characters)"
    try:
        path = (templates_dir / name).resolve()
        root = templates_dir.resolve()
        if root not in path.parents:
            raise TemplateError(f"template {shown!r} is outside {templates_dir}", field="template")
        if not path.is_file():
            raise TemplateError(f"template {shown!r} not found under {templates_dir}", field="template")
        return TemplateSource(name=name, text=path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TemplateError(f"template {shown!r} is not UTF-8 text", field="template") from exc
    except (OSError, ValueError) as exc:  # a name too long for the file system (ENAMETOOLONG), a NUL
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TemplateError(f"template {shown!r} cannot be read: {reason}", field="template") from exc


def undeclared(source: TemplateSource) -> set[str]:
    """Top-level names the template reads; raises ``TemplateError`` on a syntax error."""
    try:
        ast = _ENV.parse(source.text)
        return set(meta.find_undeclared_variables(ast))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template syntax error: {exc.message}", path=source.name, line=exc.lineno, field="template"
        ) from exc
    except (RecursionError, SyntaxError) as exc:  # thousands of nested brackets or blocks
        raise TemplateError("template is nested too deeply", path=source.name, field="template") from exc


@dataclass(frozen=True)
class Composer:
    """Renders one campaign's messages; compiled once per run and reused for every recipient."""

    source: TemplateSource
    signature: str
    opt_out_text: str
    variables: Mapping[str, Any]
    campaign: Mapping[str, Any]

    def __post_init__(self) -> None:
        undeclared(self.source)  # surface syntax errors with their line
        try:
            template = _ENV.from_string(self.source.text)
        except (RecursionError, SyntaxError) as exc:  # Python cannot compile blocks nested that deep
            raise TemplateError("template is nested too deeply", path=self.source.name, field="template") from exc
        object.__setattr__(self, "_template", template)
        # the template's globals (jinja's own, the environment's) as one plain dict, merged once per run
        object.__setattr__(self, "_globals", dict(template.globals))
        # and every name a render sees but the recipient, merged once too: a render adds only the recipient
        base = {**self._globals, **self.variables, "campaign": self.campaign}  # type: ignore[attr-defined]
        object.__setattr__(self, "_base", base)

    def _generate(self, template: jinja2.Template, recipient: Mapping[str, Any]) -> Iterator[str]:
        """``Template.generate`` without merging the template's globals into every recipient's context anew.

        ``generate`` copies the globals, a ``ChainMap`` read key by key in Python, into a new dict for
        each render, and its context then iterates them once more: about 8 % of a worker's CPU per
        recipient. Here they are merged once with the campaign's variables (``_base``), and each
        render's context is one new dict of those and the recipient, as ``generate`` builds it. The
        compiled template, and with it the sandbox, is the same; an exception is handed to the
        environment as ``generate`` does, which rewrites its traceback to template lines.
        """
        globals_: dict[str, Any] = self._globals  # type: ignore[attr-defined]  # set in __post_init__
        base: dict[str, Any] = self._base  # type: ignore[attr-defined]  # set in __post_init__
        ctx = template.environment.context_class(
            template.environment, {**base, "recipient": recipient}, template.name, template.blocks, globals=globals_
        )
        try:
            yield from template.root_render_func(ctx)
        except Exception:
            yield template.environment.handle_exception()

    def body(self, recipient: Mapping[str, Any]) -> str:
        budget = _LOOP_BUDGET.set([MAX_LOOP_ITERATIONS])
        try:
            chunks: list[str] = []
            size = 0
            template: jinja2.Template = self._template  # type: ignore[attr-defined]  # set in __post_init__
            output = self._generate(template, recipient)
            # read the output piece by piece and stop past the bound, rather than build it all first
            for chunk in output:
                size += len(chunk)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise TemplateError(
                        str(_too_long()), path=self.source.name, line=_output_line(template, output), field="template"
                    )
                chunks.append(chunk)
            text = "".join(chunks)
        except TemplateTooLarge as exc:
            raise TemplateError(str(exc), path=self.source.name, line=_template_line(exc), field="template") from exc
        except RecursionError as exc:
            raise TemplateError(
                "template calls itself too deeply (a macro without an end?)", path=self.source.name, field="template"
            ) from exc
        except jinja2.UndefinedError as exc:
            raise TemplateError(
                f"template needs a value that is not given: {exc.message}",
                path=self.source.name,
                field="variables",
            ) from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template failed to render: {exc}", path=self.source.name) from exc
        finally:
            _LOOP_BUDGET.reset(budget)
        reason = bad_character(text, allow=LINE_BREAKS)
        if reason:
            raise TemplateError(f"the rendered text {reason}", path=self.source.name, field="template")
        if text.isprintable():
            # no line break, tab or other separator (most texts): the lines below are the text itself
            return text.strip()
        return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())

    def compose(self, recipient: Mapping[str, Any]) -> str:
        body = self.body(recipient)
        return f"{self.signature}{body}{self.opt_out_text}"

    def render(self, recipient: Mapping[str, Any]) -> tuple[str, Segmentation]:
        text = self.compose(recipient)
        return text, segment(text)
