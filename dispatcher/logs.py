"""structlog set-up: JSON lines in workers, readable console output on a terminal.

Context (run, campaign, batch) is bound per unit of work with
``structlog.contextvars`` and merged into every line. The last processor before
rendering masks phone numbers and secrets wherever they appear, so no call site
has to remember to.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .redact import scrub

_SECRET_WORDS = ("token", "secret", "password", "auth", "api_key", "apikey", "credential")


def _mask_value(key: str, value: Any) -> Any:
    if any(word in key.lower() for word in _SECRET_WORDS):
        return "[redacted]"
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(key, v) for v in value]
    return value


def mask_sensitive(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask phone numbers and redact secrets in every field."""
    for key in list(event_dict):
        event_dict[key] = _mask_value(key, event_dict[key])
    return event_dict


def configure(fmt: str = "", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure structlog (and stdlib logging, which Dramatiq uses) once per process."""
    stream = stream or sys.stderr
    if not fmt:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_sensitive,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


class _MaskingFormatter(logging.Formatter):
    """Every stdlib record (Dramatiq's message arguments, uvicorn's tracebacks) gets the same masking pass."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def get_logger(name: str = "dispatcher") -> Any:
    return structlog.get_logger(name)
