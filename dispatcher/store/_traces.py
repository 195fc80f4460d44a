"""The per-attempt HTTP traces as operators read them, and their retention purge.

A trace is the redacted JSON an adapter recorded for one attempt (``attempts.trace``). It is
not part of any ledger hash: an attempt row is tied to its ledger event by delivery and
instant only (``audit verify`` checks they line up), so clearing the trace text leaves ``audit verify``
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
from ._rows import as_utc, attempt_row, delivery_row, rows_of_phone
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

    def delivery(
        self,
        run_id: str,
        *,
        phone: str | None = None,
        event_id: int | None = None,
        delivery_id: int | None = None,
    ) -> StoredDelivery | None:
        """The run's delivery to ``phone`` (E.164), or the one a ledger event of the run names; None if none.

        By phone the row is found through indexes (``rows_of_phone``), not the phone column.
        An event about a whole batch (a worker's results) names many deliveries: ``delivery_id`` picks
        one of them (and must be one it names).
        """
        d, e = t.deliveries, t.events
        with self._db.read() as conn:
            if phone is not None:
                key = delivery_key(run_id, phone)
                where = sa.and_(
                    d.c.run_id == run_id, d.c.id.in_(rows_of_phone([d.c.id], phone, key, by_key=self._db.is_sqlite))
                )
            elif event_id is not None:
                event = conn.execute(
                    sa.select(e.c.delivery_id, e.c.kind, e.c.from_state, e.c.to_state, e.c.payload).where(
                        e.c.id == event_id, e.c.run_id == run_id
                    )
                ).first()
                if event is None:
                    return None
                target = event.delivery_id
                if target is None and delivery_id is not None:
                    changes = ledger.row_changes(event.kind, event.from_state, event.to_state, event.payload)
                    target = delivery_id if any(c.delivery_id == delivery_id for c in changes) else None
                if target is None:
                    return None
                where = sa.and_(d.c.id == target, d.c.run_id == run_id)
            else:
                return None
            row = conn.execute(sa.select(d).where(where)).mappings().first()
            if row is None:
                return None
            events = self._events(conn, row)
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
    def _events(conn: Any, row: Any) -> tuple[StoredEvent, ...]:
        """The delivery's events: its own (by key), and its rows of its batch chain's claims and results."""
        e = t.events
        run_id = row["run_id"]
        cols = (e.c.id, e.c.seq, e.c.kind, e.c.from_state, e.c.to_state, e.c.error_code, e.c.reason, e.c.actor)
        # by key only (ix_events_key): a run's chain can be long, one person's events are few
        rows = conn.execute(sa.select(*cols, e.c.at, e.c.run_id).where(e.c.key == row["key"])).all()
        found = [
            StoredEvent(r.id, r.seq, r.kind, r.from_state, r.to_state, r.error_code, r.reason, r.actor, _at(r.at))
            for r in rows
            if r.run_id == run_id
        ]
        # a batch chain's events (uq_events_chain_seq); a run made before batch chains has only its own
        chain = sa.or_(e.c.batch == row["batch_no"], e.c.batch.is_(None))
        for r in conn.execute(
            sa.select(*cols, e.c.at, e.c.payload).where(e.c.run_id == run_id, chain, e.c.kind.in_(ledger.BATCH_KINDS))
        ):
            for c in ledger.row_changes(r.kind, r.from_state, r.to_state, r.payload):
                if c.delivery_id == row["id"]:
                    found.append(StoredEvent(
                        r.id, r.seq, "delivery.state", c.from_state, c.to_state, c.error_code, c.reason, r.actor,
                        _at(r.at),
                    ))  # fmt: skip
        # one chain holds all of a delivery's events, so their seqs order them
        return tuple(sorted(found, key=lambda ev: ev.seq))

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
