"""The per-attempt HTTP traces as operators read them, and their retention purge.

A trace is the redacted JSON an adapter recorded for one attempt (``attempts.trace``). It is
not part of any ledger hash: an attempt row is tied to its ledger event by delivery and
instant only (``ledger._check_attempts``), so clearing the trace text leaves ``audit verify``
passing. The purge keeps the attempt row and stamps ``trace_purged_at``, and appends a
``trace.purge`` event (who, the cut-off, how many) to the audit chain in the same transaction:
a purge that is not on record cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..keys import delivery_key
from . import ledger
from . import schema as t
from ._db import Db
from ._rows import as_utc, attempt_row, delivery_row
from .base import AttemptRow, DeliveryRow


@dataclass(frozen=True)
class StoredEvent:
    """One ledger event of a delivery (its state history)."""

    id: int
    seq: int
    kind: str
    from_state: str | None
    to_state: str | None
    error_code: str | None
    reason: str | None
    actor: str
    at: datetime


@dataclass(frozen=True)
class StoredAttempt:
    """One hand-over to a gateway (its ``attempts`` row) with the ledger event written with it
    (same delivery, same instant); None when no event lines up."""

    row: AttemptRow
    event: StoredEvent | None


@dataclass(frozen=True)
class StoredDelivery:
    """A delivery row with its history: its attempts and its ledger events, oldest first."""

    row: DeliveryRow
    attempts: tuple[StoredAttempt, ...]
    events: tuple[StoredEvent, ...]


class TraceReads:
    """Reached as ``store.traces``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def run_exists(self, run_id: str) -> bool:
        with self._db.read() as conn:
            return conn.execute(sa.select(t.runs.c.id).where(t.runs.c.id == run_id)).first() is not None

    def delivery(self, run_id: str, *, phone: str | None = None, event_id: int | None = None) -> StoredDelivery | None:
        """The run's delivery to ``phone`` (E.164), or the one a ledger event of the run names; None if none.

        By phone the row is found through its unique idempotency key (indexed), not the phone column.
        """
        d = t.deliveries
        with self._db.read() as conn:
            if phone is not None:
                where = d.c.key == delivery_key(run_id, phone)
            elif event_id is not None:
                named = sa.select(t.events.c.delivery_id).where(t.events.c.id == event_id, t.events.c.run_id == run_id)
                where = sa.and_(d.c.id == named.scalar_subquery(), d.c.run_id == run_id)
            else:
                return None
            row = conn.execute(sa.select(d).where(where)).mappings().first()
            if row is None:
                return None
            events = self._events(conn, row["key"], run_id)
            a = t.attempts
            attempt_rows = (
                conn.execute(sa.select(a).where(a.c.delivery_id == row["id"]).order_by(a.c.id)).mappings().all()
            )
        # an attempt and its event are written in one transaction with the same instant; the claim
        # (pending -> sending) can share that instant under a frozen clock, so the answer is preferred
        at_instant = {e.at: e for e in events if e.kind in ("delivery.state", "delivery.late")}
        answers = {e.at: e for e in events if e.kind == "delivery.late" or e.from_state == "sending"}
        handovers = {**at_instant, **answers}
        attempts = tuple(
            StoredAttempt(row=a_row, event=handovers.get(a_row.at))
            for a_row in (attempt_row(r) for r in attempt_rows)
        )
        return StoredDelivery(row=delivery_row(row), attempts=attempts, events=events)

    @staticmethod
    def _events(conn: Any, key: str, run_id: str) -> tuple[StoredEvent, ...]:
        e = t.events
        cols = (e.c.id, e.c.seq, e.c.kind, e.c.from_state, e.c.to_state, e.c.error_code, e.c.reason, e.c.actor)
        # by key only (ix_events_key): a run's chain can be long, one person's events are few
        rows = conn.execute(sa.select(*cols, e.c.at, e.c.run_id).where(e.c.key == key)).all()
        return tuple(
            StoredEvent(r.id, r.seq, r.kind, r.from_state, r.to_state, r.error_code, r.reason, r.actor, _at(r.at))
            for r in sorted(rows, key=lambda r: r.seq)
            if r.run_id == run_id
        )

    def purge(self, before: datetime, *, actor: str, payload: dict[str, Any]) -> int:
        """Clear the trace text of every attempt made before ``before``; returns how many were cleared.

        The audit chain gets a ``trace.purge`` event (``payload`` plus the count) in the same
        transaction, also when nothing was old enough: the purge ran, and that is on record.
        """
        a = t.attempts
        now = self._db.now()
        with self._db.write() as conn:
            cleared = conn.execute(
                sa.update(a).where(a.c.at < before, a.c.trace.is_not(None)).values(trace=None, trace_purged_at=now)
            ).rowcount
            event = ledger.Event("trace.purge", actor=actor, payload={**payload, "attempts": int(cleared)})
            ledger.append(conn, ledger.AUDIT_CHAIN, [event], now)
        return int(cleared)


def _at(value: datetime) -> datetime:
    out = as_utc(value)
    assert out is not None
    return out
