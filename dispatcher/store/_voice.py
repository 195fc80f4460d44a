"""Voice calls' own writes and reads: what a call says, and the listener's key press (``store.voice``).

A call's state (``sent`` -> ``delivered``/``failed``) moves through ``provider_events.apply_status``
like any delivery report. What only a call has is the key press: pressing 1 sets
``deliveries.confirmed_at`` once and appends a ``delivery.confirmed`` event to the run's chain, in
one transaction, with the attempt row that records the press (``audit verify`` pairs the two by
instant). Any other digit is kept the same way as a ``delivery.keypress`` event and confirms nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import select

from . import ledger
from . import schema as t
from ._db import Db
from ._rows import as_utc

#: the digit a listener presses to confirm they heard the warning
CONFIRM_DIGIT = "1"
VOICE_CHANNEL = "voice"


@dataclass(frozen=True)
class CallTarget:
    """A voice delivery row with what its script is rendered from (no number: it is never needed here)."""

    id: int
    run_id: str
    key: str
    state: str
    provider_id: str | None
    name: str
    district: str
    grid: str
    confirmed_at: datetime | None


class VoiceCalls:
    """Reads and writes of voice deliveries over one ``Db``."""

    def __init__(self, db: Db, reporter_gateways: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self._db = db
        #: as for delivery reports: a key press reported with one provider's secret only touches its calls
        self._reporter_gateways: Mapping[str, tuple[str, ...]] = dict(reporter_gateways or {})

    def call_target(self, delivery_id: int) -> CallTarget | None:
        """The voice delivery ``delivery_id`` (None when there is none, or it is not a call)."""
        d, r, runs = t.deliveries, t.residents, t.runs
        query = (
            select(
                d.c.id,
                d.c.run_id,
                d.c.key,
                d.c.state,
                d.c.provider_id,
                d.c.district,
                d.c.grid,
                d.c.confirmed_at,
                sa.func.coalesce(r.c.name, "").label("name"),
            )
            .select_from(d.join(runs, runs.c.id == d.c.run_id).outerjoin(r, r.c.id == d.c.resident_id))
            .where(d.c.id == delivery_id, runs.c.channel == VOICE_CHANNEL)
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return CallTarget(
            row.id, row.run_id, row.key, row.state, row.provider_id, row.name or "", row.district, row.grid,
            as_utc(row.confirmed_at),
        )  # fmt: skip

    def key_press(self, delivery_id: int | None, digits: str, *, call_sid: str | None, actor: str) -> str:
        """Record what the listener pressed on the call of ``delivery_id`` (None: the row holding ``call_sid``).

        Returns ``confirmed`` (first press of 1), ``repeated`` (1 again: nothing changes),
        ``recorded`` (another digit: kept, confirms nothing) or ``unknown`` (no such call, or
        ``call_sid`` names another call than the one the row holds).
        """
        d = t.deliveries
        now = self._db.now()
        if delivery_id is None and not call_sid:
            return "unknown"
        which = d.c.id == delivery_id if delivery_id is not None else d.c.provider_id == call_sid
        query = (
            select(d.c.id, d.c.run_id, d.c.key, d.c.state, d.c.provider_id, d.c.attempts, d.c.gateway,
                   d.c.confirmed_at)
            .select_from(d.join(t.runs, t.runs.c.id == d.c.run_id))
            .where(which, t.runs.c.channel == VOICE_CHANNEL)
        )  # fmt: skip
        gateways = self._reporter_gateways.get(actor)
        if gateways is not None:
            query = query.where(d.c.gateway.in_(gateways))
        with self._db.write() as conn:
            row = conn.execute(query).first()
            if row is None or (call_sid and row.provider_id and row.provider_id != call_sid):
                return "unknown"
            confirming = digits == CONFIRM_DIGIT
            if confirming and row.confirmed_at is not None:
                return "repeated"
            if confirming:
                done = conn.execute(
                    sa.update(d).where(d.c.id == row.id, d.c.confirmed_at.is_(None)).values(confirmed_at=now)
                ).rowcount
                if not done:
                    return "repeated"
            kind = "delivery.confirmed" if confirming else "delivery.keypress"
            conn.execute(
                sa.insert(t.attempts).values(
                    delivery_id=row.id,
                    run_id=row.run_id,
                    attempt=row.attempts,
                    gateway=row.gateway or actor,
                    outcome="keypress",
                    provider_id=call_sid or row.provider_id,
                    error_message=f"digits {digits[:8]}",
                    at=now,
                )
            )
            event = ledger.Event(
                kind, row.key, row.id, row.state, row.state, provider_id=call_sid or row.provider_id,
                reason="key_press", actor=actor, payload={"digits": digits[:8]},
            )  # fmt: skip
            ledger.append(conn, row.run_id, [event], now)
        return "confirmed" if confirming else "recorded"

    def call_outcomes(self, run_id: str) -> dict[str, int]:
        """A voice run's calls: ``placed`` (a provider took them), ``answered``, ``confirmed`` (pressed 1),
        and the calls that failed after placing by why (``busy``, ``no_answer``, ``failed``, ``canceled``)."""
        d = t.deliveries
        with self._db.read() as conn:
            placed, answered, confirmed = conn.execute(
                select(
                    sa.func.count(d.c.provider_id),
                    sa.func.count(sa.case((d.c.state == "delivered", 1))),
                    sa.func.count(d.c.confirmed_at),
                ).where(d.c.run_id == run_id)
            ).one()
            failures = conn.execute(
                select(d.c.error_code, sa.func.count())
                .where(d.c.run_id == run_id, d.c.state == "failed", d.c.error_code.like("voice.%"))
                .group_by(d.c.error_code)
            ).all()
        out = {"placed": int(placed), "answered": int(answered), "confirmed": int(confirmed)}
        out.update({str(code).removeprefix("voice."): int(n) for code, n in sorted(failures)})
        return out

    def confirmed_count(self, run_id: str) -> int:
        """How many calls of the run the listener confirmed (pressed 1)."""
        d = t.deliveries
        with self._db.read() as conn:
            return int(
                conn.execute(
                    select(sa.func.count()).where(d.c.run_id == run_id, d.c.confirmed_at.is_not(None))
                ).scalar_one()
            )
