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

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpx

from .redaction import Redactor

_current: ContextVar[list[dict[str, Any]] | None] = ContextVar("dispatch_http_trace", default=None)


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
            # an operator reading a trace wants to see that credentials were sent, never what they were:
            # Authorization and every other secret-named header are kept as ``[redacted]``
            "request_headers": _headers(self.redactor, request.headers),
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


def _headers(redactor: Redactor, headers: httpx.Headers) -> dict[str, str]:
    return {str(k): str(v) for k, v in redactor.value({k.title(): v for k, v in headers.items()}).items()}
