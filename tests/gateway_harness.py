"""Courier-style gateway tests: each case is a row of data (messages, expected exchanges, expected results).

``run_case`` builds the gateway on an ``httpx.MockTransport`` that answers from the
case's exchanges in order, and fails the test when:

- the gateway opens a real socket (``socket.socket.connect`` is blocked for the case);
- it makes a request the case did not expect, or leaves an expected exchange unused;
- a request lacks a field the case says it must carry;
- a result differs from the expected one;
- a trace (kept on results and on errors) holds a secret or a full phone number,
  or an exchange was made without being traced.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx

from dispatcher.errors import SendError
from dispatcher.providers.base import Gateway, OutgoingMessage, SendResult


@dataclass(frozen=True)
class Exchange:
    """One expected request and the reply to give (or the transport error to raise)."""

    method: str
    path: str
    status: int = 200
    reply: Any = None
    #: fields the request body (JSON or form) must carry, with these values
    request_has: dict[str, Any] = field(default_factory=dict)
    #: fields the request body must not carry
    request_lacks: tuple[str, ...] = ()
    headers_have: dict[str, str] = field(default_factory=dict)
    raise_: type[httpx.HTTPError] | None = None


@dataclass(frozen=True)
class Sent:
    provider_id: str


@dataclass(frozen=True)
class Failed:
    error: type[SendError]
    code: str
    opt_out: bool = False


@dataclass(frozen=True)
class Case:
    label: str
    messages: Sequence[OutgoingMessage]
    exchanges: Sequence[Exchange]
    expect: Sequence[Sent | Failed]


def message(
    to: str, body: str = "【常州经开区反诈中心】警惕冒充客服退款诈骗。回T退订", key: str | None = None
) -> OutgoingMessage:
    return OutgoingMessage(
        key=key or f"run-1:{to}",
        run_id="run-1",
        campaign_id="harness",
        to=to,
        body=body,
        parts=1,
        encoding="UCS-2",
    )


@contextmanager
def no_real_network() -> Iterator[None]:
    """Any real connection attempt inside the block fails the test."""
    original = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"a gateway test tried a real network connection to {address!r}")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]


def _request_fields(request: httpx.Request) -> dict[str, Any]:
    raw = request.content.decode("utf-8") if request.content else ""
    if "json" in request.headers.get("content-type", ""):
        return dict(json.loads(raw))
    if request.url.query:
        return dict(
            parse_qsl(request.url.query.decode() if isinstance(request.url.query, bytes) else request.url.query)
        )
    return dict(parse_qsl(raw, keep_blank_values=True))


def run_case(make_gateway: Callable[[httpx.MockTransport], Gateway], case: Case, secrets: Sequence[str]) -> None:
    pending = list(case.exchanges)
    made: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert pending, f"{case.label}: unexpected request {request.method} {request.url.path}"
        expected = pending.pop(0)
        made.append(f"{request.method} {request.url.path}")
        assert (request.method, request.url.path) == (expected.method, expected.path), case.label
        fields = _request_fields(request)
        for name, value in expected.request_has.items():
            assert fields.get(name) == value, (
                f"{case.label}: request field {name} = {fields.get(name)!r}, want {value!r}"
            )
        for name in expected.request_lacks:
            assert name not in fields, f"{case.label}: request must not carry {name}"
        for name, value in expected.headers_have.items():
            assert request.headers.get(name) == value, f"{case.label}: header {name}"
        if expected.raise_ is not None:
            raise expected.raise_("injected by the case", request=request)
        if isinstance(expected.reply, str | bytes):
            return httpx.Response(expected.status, content=expected.reply)
        return httpx.Response(expected.status, json=expected.reply)

    with no_real_network():
        gateway = make_gateway(httpx.MockTransport(handler))
        try:
            results = gateway.send_many(list(case.messages))
        finally:
            gateway.close()
    assert not pending, f"{case.label}: mock exchanges left unused: {[f'{e.method} {e.path}' for e in pending]}"
    assert len(results) == len(case.expect), case.label
    traced = 0
    for msg, result, want in zip(case.messages, results, case.expect, strict=True):
        if isinstance(want, Sent):
            assert isinstance(result, SendResult), f"{case.label}: {msg.to} failed: {result!r}"
            assert result.provider_id == want.provider_id, case.label
            trace = result.trace
        else:
            assert isinstance(result, want.error), f"{case.label}: {msg.to}: got {result!r}, want {want.error.__name__}"
            assert result.code == want.code, f"{case.label}: code {result.code}, want {want.code}"
            assert getattr(result, "opt_out", False) == want.opt_out, f"{case.label}: opt_out"
            trace = result.trace
        assert trace, f"{case.label}: {msg.to}: no trace kept"
        traced += sum(1 for entry in trace if "method" in entry)
        assert_redacted(case.label, trace, secrets, [m.to for m in case.messages])
    assert traced >= len(made), f"{case.label}: {len(made)} exchanges made, only {traced} traced"


def assert_redacted(label: str, trace: Any, secrets: Sequence[str], phones: Sequence[str]) -> None:
    blob = json.dumps(trace, ensure_ascii=False)
    for secret in secrets:
        assert secret not in blob, f"{label}: secret left in the trace"
    for phone in phones:
        assert phone not in blob and phone.lstrip("+") not in blob, f"{label}: unmasked phone number in the trace"
