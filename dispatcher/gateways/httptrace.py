"""HTTP exchanges of a send, recorded and redacted, for the attempt they belong to.

Auditors want to see what was said to a provider for each message (courier keeps
a "channel log" per message); operators must never find a credential or a full
phone number in it. So every exchange an adapter makes goes through
``TracedHttp.request``, which times it and appends one redacted dict to the trace
of the *current* send. The current trace lives in a ``ContextVar`` because one
gateway object serves several worker threads at once: each thread collects its
own exchanges.

Redaction happens when the trace is written, not when it is read: the delivery log
only ever holds ``[redacted]`` and masked numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import httpx

from ..redact import scrub

REDACTED = "[redacted]"
#: header and field names whose value is always a credential
_SECRET_NAMES = (
    "authorization",
    "token",
    "secret",
    "password",
    "api_key",
    "apikey",
    "x-api-key",
    "signature",
    "cookie",
)
#: bodies longer than this are cut in the trace (a batch of 10,000 numbers is not worth storing twice)
MAX_BODY_CHARS = 4000

_current: ContextVar[list[dict[str, Any]] | None] = ContextVar("dispatch_http_trace", default=None)


class Redactor:
    """Replaces known secret values, credentials recognisable by shape and phone numbers anywhere in a value."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values: set[str] = set()
        for s in secrets:
            if s and len(s) >= 4:
                values.add(s)
                values.add(quote(s, safe=""))  # as it appears in a URL or a form body
        # longest first, so a secret containing another is replaced whole
        self.secrets = sorted(values, key=len, reverse=True)

    def text(self, value: str) -> str:
        if "%" in value:
            value = unquote(value)  # a number in a query string is %2B86...: decode so it is seen
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return scrub(value)

    def value(self, value: Any, key: str = "") -> Any:
        if key and any(word in key.lower() for word in _SECRET_NAMES):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {str(k): self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v, key) for v in value]
        return value

    def body(self, raw: bytes | str | None, content_type: str = "") -> Any:
        """A request or response body as data when it parses (JSON, form), else as text; redacted."""
        if raw is None or raw in (b"", ""):
            return None
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parsed: Any = text
        if "json" in content_type or text[:1] in ("{", "["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
        elif "x-www-form-urlencoded" in content_type:
            parsed = {}
            for k, v in parse_qsl(text, keep_blank_values=True):
                parsed[k] = v if k not in parsed else [*(parsed[k] if isinstance(parsed[k], list) else [parsed[k]]), v]
        redacted = self.value(parsed)
        if isinstance(redacted, str) and len(redacted) > MAX_BODY_CHARS:
            return redacted[:MAX_BODY_CHARS] + f"…[{len(redacted) - MAX_BODY_CHARS} more characters]"
        dumped = json.dumps(redacted, ensure_ascii=False)
        if len(dumped) > MAX_BODY_CHARS:
            return dumped[:MAX_BODY_CHARS] + f"…[{len(dumped) - MAX_BODY_CHARS} more characters]"
        return redacted


@contextmanager
def collecting() -> Iterator[list[dict[str, Any]]]:
    """Collect the exchanges made inside the block (this thread/context only).

    Blocks nest: an enclosing block sees the exchanges of the inner ones too.
    """
    outer = _current.get()
    trace: list[dict[str, Any]] = []
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)
        if outer is not None:
            outer.extend(trace)


def record(entry: dict[str, Any]) -> None:
    trace = _current.get()
    if trace is not None:
        trace.append(entry)


class TracedHttp:
    """An ``httpx.Client`` (timeouts, keep-alive pool, injectable transport) that traces every exchange."""

    def __init__(
        self,
        *,
        redactor: Redactor,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 20,
    ) -> None:
        self.redactor = redactor
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send one request; the exchange (or the failure) is appended to the current trace.

        httpx exceptions propagate unchanged: the adapter decides what they mean
        (a refused connection is safe to retry, a read timeout is ambiguous).
        """
        started = time.perf_counter()
        request = self.client.build_request(method, url, **kwargs)
        entry: dict[str, Any] = {
            "method": request.method,
            "url": self.redactor.text(str(request.url)),
            "request": self.redactor.body(request.content, request.headers.get("content-type", "")),
        }
        try:
            response = self.client.send(request)
        except httpx.HTTPError as exc:
            entry.update(
                status=None,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
                error=f"{type(exc).__name__}: {self.redactor.text(str(exc))}",
            )
            record(entry)
            raise
        entry.update(
            status=response.status_code,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
            response=self.redactor.body(response.content, response.headers.get("content-type", "")),
        )
        record(entry)
        return response

    def close(self) -> None:
        self.client.close()
