"""Message templates: sandboxed Jinja2 with strict undefined, and the composed SMS text.

Templates are operator-written files, so they render in Jinja2's sandbox (no
attribute access to Python internals) with ``StrictUndefined`` (a misspelt
variable is an error, never an empty string in a message to 20,000 people).

The text a resident receives is ``signature + body + opt_out``: the signature
【…】 leads, as China's SMS rules require, and the opt-out closes awareness
messages. Every character of all three counts towards the parts billed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from .errors import TemplateError
from .sms import Segmentation, segment

#: names every template may use without the campaign declaring them
BUILTIN_NAMES = frozenset({"recipient", "campaign"})

#: the sample recipient validation and preview render with (the shortest real values make the
#: "can never fit" check a lower bound; preview shows the typical text)
SAMPLE_RECIPIENT = {"name": "居民", "district": "横林镇", "grid": "HL-01"}


def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(
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
    path = (templates_dir / name).resolve()
    root = templates_dir.resolve()
    if root not in path.parents:
        raise TemplateError(f"template {name!r} is outside {templates_dir}", field="template")
    if not path.is_file():
        raise TemplateError(f"template {name!r} not found under {templates_dir}", field="template")
    try:
        return TemplateSource(name=name, text=path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TemplateError(f"template {name!r} is not UTF-8 text", field="template") from exc


def undeclared(source: TemplateSource) -> set[str]:
    """Top-level names the template reads; raises ``TemplateError`` on a syntax error."""
    try:
        ast = _ENV.parse(source.text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template syntax error: {exc.message}", path=source.name, line=exc.lineno, field="template"
        ) from exc
    return set(meta.find_undeclared_variables(ast))


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
        object.__setattr__(self, "_template", _ENV.from_string(self.source.text))

    def body(self, recipient: Mapping[str, Any]) -> str:
        context = {**self.variables, "recipient": recipient, "campaign": self.campaign}
        try:
            text: str = self._template.render(context)  # type: ignore[attr-defined]  # set in __post_init__
        except jinja2.UndefinedError as exc:
            raise TemplateError(
                f"template needs a value that is not given: {exc.message}",
                path=self.source.name,
                field="variables",
            ) from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template failed to render: {exc}", path=self.source.name) from exc
        return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())

    def compose(self, recipient: Mapping[str, Any]) -> str:
        body = self.body(recipient)
        return f"{self.signature}{body}{self.opt_out_text}"

    def render(self, recipient: Mapping[str, Any]) -> tuple[str, Segmentation]:
        text = self.compose(recipient)
        return text, segment(text)
