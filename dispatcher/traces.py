"""What an operator reads about one person in one run: every attempt, its state change and HTTP exchange.

The exchanges are shown as they were stored: adapters redact credentials and numbers
when they write a trace (providers/httptrace.py), so nothing here unmasks anything;
the person's number, key and provider id are masked like every other output.

Looking a person up is a search by number, and a trace is what was said about them to a
provider, so every view (command line or dashboard) is appended to the audit chain as a
``trace.view`` event before anything is shown, with the number masked and a keyed digest
to match on, exactly like ``audit.search``.

Traces are kept for a period (``DISPATCH_TRACE_RETENTION``); ``purge`` clears the trace text
of older attempts. The attempts and the ledger stay: no ledger hash covers a trace, so
``dispatch audit verify`` passes after a purge, and the purge itself is on the audit chain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .audit import phone_hmac, phone_key
from .campaigns import parse_duration
from .errors import UsageError
from .phones import InvalidPhone, mask, mask_text, normalise
from .store import SqlStore, StoredAttempt, StoredDelivery

#: what an attempt's trace is: exchanges kept, cleared by the retention purge, or never recorded
#: (an adapter that speaks no HTTP, such as the outbox)
KEPT, PURGED, NONE = "kept", "purged", "none"


def parse_phone(raw: str) -> str:
    """E.164 of an operator's number; a malformed one is a one-line ``UsageError`` (exit 2), masked."""
    try:
        return normalise(raw)
    except InvalidPhone as exc:
        raise UsageError(f"{exc} (give the person's number)", field="phone") from exc


def delivery_trace(
    store: SqlStore,
    run_id: str,
    *,
    phone: str | None = None,
    event_id: int | None = None,
    delivery_id: int | None = None,
    actor: str,
    via: str,
) -> dict[str, Any]:
    """The trace of the run's delivery to ``phone`` (or the one ledger event ``event_id`` names; of a
    batch's event, the one of its deliveries ``delivery_id`` says), masked.

    The view is recorded before the delivery is looked up: whether a number is in a run is
    itself what a search reveals. An unknown run, or a person not in it, is a ``UsageError``.
    """
    number = parse_phone(phone) if phone is not None else None
    if not store.traces.run_exists(run_id):
        raise UsageError(f"no run with id {run_id!r} (see `dispatch runs`)", field="run")
    if number is not None:
        _record_view(store, actor=actor, via=via, run_id=run_id, phone=number)
        found = store.traces.delivery(run_id, phone=number)
        if found is None:
            raise UsageError(f"nobody with number {mask(number)} in run {run_id}", field="phone")
    else:
        found = (
            store.traces.delivery(run_id, event_id=event_id, delivery_id=delivery_id) if event_id is not None else None
        )
        if found is None:
            raise UsageError(f"no delivery for ledger event {event_id} in run {run_id}", field="event")
        _record_view(store, actor=actor, via=via, run_id=run_id, phone=found.row.phone)
    return _as_dict(found)


def _record_view(store: SqlStore, *, actor: str, via: str, run_id: str, phone: str) -> None:
    payload = {"run": run_id, "phone": mask(phone), "phone_hmac": phone_hmac(phone_key(store), phone), "via": via}
    store.audit.append("trace.view", actor=actor, payload=payload)


def _as_dict(d: StoredDelivery) -> dict[str, Any]:
    row = d.row
    return {
        "run_id": row.run_id,
        "phone": mask(row.phone),
        "key": mask_text(row.key),
        "state": row.state,
        "gateway": row.gateway,
        # provider ids may embed the number (the outbox's do)
        "provider_id": mask_text(row.provider_id) if row.provider_id else None,
        "error_code": row.error_code,
        "attempts": [_attempt(a) for a in d.attempts],
        "events": [
            {
                "seq": e.seq,
                "at": e.at.isoformat(),
                "kind": e.kind,
                "from_state": e.from_state,
                "to_state": e.to_state,
                "error_code": e.error_code,
                "reason": e.reason,
                "actor": e.actor,
            }
            for e in d.events
        ],
    }


def _attempt(stored: StoredAttempt) -> dict[str, Any]:
    a, event = stored.row, stored.event
    if a.trace is not None:
        status, exchanges = KEPT, _exchanges(a.trace)
    elif a.trace_purged_at is not None:
        status, exchanges = PURGED, []
    else:
        status, exchanges = NONE, []
    return {
        "attempt": a.attempt,
        "at": a.at.isoformat(),
        "gateway": a.gateway,
        "outcome": a.outcome,
        "from_state": event.from_state if event else None,
        "to_state": event.to_state if event else None,
        "provider_id": mask_text(a.provider_id) if a.provider_id else None,
        "error_code": a.error_code,
        "error_message": a.error_message,
        "trace": status,
        "trace_purged_at": a.trace_purged_at.isoformat() if a.trace_purged_at else None,
        "exchanges": exchanges,
    }


def _exchanges(text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError:
        # written by something other than our adapters; shown as text rather than hidden
        return [{"raw": text}]
    return [x for x in data if isinstance(x, dict)] if isinstance(data, list) else [{"raw": data}]


# ------------------------------------------------------------------ retention


@dataclass(frozen=True)
class Purged:
    older_than: str
    before: datetime
    attempts: int


def purge(store: SqlStore, older_than: str | None, *, default: str, actor: str, via: str) -> Purged:
    """Clear the trace text of attempts older than ``older_than`` (else the configured ``default``)."""
    text = (older_than or default).strip()
    try:
        period = parse_duration(text)
        if period <= timedelta(0):
            raise ValueError("the period must be longer than 0")
    except ValueError as exc:
        raise UsageError(str(exc), field="traces-older-than") from exc
    before = store.clock() - period
    payload = {"older_than": text, "before": before.isoformat(), "via": via}
    return Purged(text, before, store.traces.purge(before, actor=actor, payload=payload))
