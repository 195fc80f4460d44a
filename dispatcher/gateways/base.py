"""The gateway adapter protocol that the outbox, Twilio, HTTP and ringback adapters implement.

A gateway hands one message to a provider (``send``) or many at once
(``send_many``, for providers that take a batch in one call), and answers which
idempotency keys it has already accepted (``lookup``), so that rows left in
``sending`` or ``unknown`` by a crash or an ambiguous reply are reconciled instead
of resent. Adapters raise only ``SendError`` subclasses (``errors.py``); the
third-party exception is chained with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from ..errors import SendError


@dataclass(frozen=True)
class OutgoingMessage:
    key: str  # idempotency key: run + phone
    run_id: str
    campaign_id: str
    to: str  # E.164
    body: str
    parts: int
    encoding: str
    #: do not deliver after this moment (provider-side validity where supported)
    send_by: datetime | None = None
    priority: str = "bulk"


@dataclass(frozen=True)
class SendResult:
    provider_id: str
    #: the provider's own status at hand-over (queued, accepted, ...)
    status: str = "sent"
    #: redacted HTTP exchanges of this send (method, url, status, elapsed_ms, bodies)
    trace: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class LookupRequest:
    """Did this message reach the provider? ``since`` is when the uncertain attempt started."""

    key: str
    to: str
    body: str
    since: datetime | None


@runtime_checkable
class Gateway(Protocol):
    name: str

    def send(self, message: OutgoingMessage) -> SendResult:
        """Hand one message over; raise a ``SendError`` subclass on failure."""
        ...

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """Hand several over; one result or error per message, in order."""
        ...

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        """The subset of ``requests`` (by key) that the provider has accepted."""
        ...

    def close(self) -> None: ...


class BaseGateway:
    """Shared behaviour: ``send_many`` as a loop for providers without a batch call."""

    name = "base"

    def send(self, message: OutgoingMessage) -> SendResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        results: list[SendResult | SendError] = []
        for message in messages:
            try:
                results.append(self.send(message))
            except SendError as exc:
                results.append(exc)
        return results

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        return None
