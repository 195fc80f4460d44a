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
        entry = _request_entry(self.redactor, request)
        try:
            response = self.client.send(request)
        except httpx.HTTPError as exc:
            record(_failed(self.redactor, entry, exc, started))
            raise
        record(_answered(self.redactor, entry, response, started))
        return response

    def close(self) -> None:
        self.client.close()


def _headers(redactor: Redactor, headers: httpx.Headers) -> dict[str, str]:
    return {str(k): str(v) for k, v in redactor.value({k.title(): v for k, v in headers.items()}).items()}


class AsyncTracedHttp:
    """``TracedHttp`` for an event loop, on aiohttp: many requests in flight, each traced into the trace of
    the task that made it (asyncio tasks each run in a copy of the context).

    aiohttp, not ``httpx.AsyncClient``: httpcore's async pool re-examines every connection for every
    queued request (a socket poll each), which at 50 connections cost 10 ms of CPU a message, four times
    the threaded client; aiohttp (the ``twilio`` library's own async transport) costs about 0.3 ms.
    Its answers are returned as ``httpx.Response`` objects so adapters read one kind of response.
    """

    def __init__(
        self,
        *,
        redactor: Redactor,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_connections: int = 20,
    ) -> None:
        self.redactor = redactor
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:  # made on the loop that uses it, as aiohttp requires
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout, connect=self._connect_timeout),
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: Any = None,
        data: dict[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One request; httpx's exceptions are raised for aiohttp's (``ConnectError`` when nothing left,
        ``ReadTimeout`` or ``ReadError`` when the request may have arrived), so adapters classify once."""
        import aiohttp

        started = time.perf_counter()
        # the request as httpx would send it: the same bytes are sent and traced
        request = httpx.Request(method, url, headers=headers, params=params, data=data, json=json)
        entry = _request_entry(self.redactor, request)
        per_call = aiohttp.ClientTimeout(total=timeout, connect=self._connect_timeout) if timeout else None
        try:
            async with self._client().request(
                request.method,
                str(request.url),
                headers=dict(request.headers),
                data=request.content,
                allow_redirects=False,
                **({"timeout": per_call} if per_call else {}),
            ) as answer:
                content = await answer.read()
                response = httpx.Response(
                    answer.status, headers=list(answer.raw_headers), content=content, request=request
                )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            failure: httpx.HTTPError = httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request)
            record(_failed(self.redactor, entry, failure, started))
            raise failure from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            failure = httpx.ReadTimeout(f"{type(exc).__name__}: {exc}", request=request)
            record(_failed(self.redactor, entry, failure, started))
            raise failure from exc
        except aiohttp.ClientError as exc:
            failure = httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request)
            record(_failed(self.redactor, entry, failure, started))
            raise failure from exc
        record(_answered(self.redactor, entry, response, started))
        return response

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _request_entry(redactor: Redactor, request: httpx.Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "url": redactor.text(str(request.url)),
        # an operator reading a trace wants to see that credentials were sent, never what they were:
        # Authorization and every other secret-named header are kept as ``[redacted]``
        "request_headers": _headers(redactor, request.headers),
        "request": redactor.body(request.content, request.headers.get("content-type", "")),
    }


def _failed(redactor: Redactor, entry: dict[str, Any], exc: httpx.HTTPError, started: float) -> dict[str, Any]:
    entry.update(
        status=None,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        error=f"{type(exc).__name__}: {redactor.text(str(exc))}",
    )
    return entry


def _answered(redactor: Redactor, entry: dict[str, Any], response: httpx.Response, started: float) -> dict[str, Any]:
    entry.update(
        status=response.status_code,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        response=redactor.body(response.content, response.headers.get("content-type", "")),
    )
    return entry
