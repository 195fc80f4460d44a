"""Run control, frequency caps, scheduler fires and the scheduler lease (issue 4), mixed into ``SqlStore``.

Every delivery state change here goes through ``SqlStore._transition`` so the ledger
records it in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from . import schema as t
from .base import CANCELLED, DELIVERED, SENDING, SENT

#: states in which a message counts against a person's frequency cap (it reached the gateway)
CAPPED_STATES = (SENT, DELIVERED)


class RunControlMixin:
    """Mixed into ``SqlStore``; uses its ``_write``/``_read``/``_transition``/``clock``."""

    clock: Callable[[], datetime]
    is_sqlite: bool
    _write: Callable[[], AbstractContextManager[Connection]]
    _read: Callable[[], AbstractContextManager[Connection]]
    _transition: Callable[..., int]
    _insert: Callable[[], Any]

    # ------------------------------------------------------------------ pause / resume / cancel

    def pause_run(self, run_id: str) -> bool:
        """Mark a running run paused; workers stop claiming its rows. False if it was not running."""
        with self._write() as conn:
            moved = conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status.in_(("running", "creating")))
                .values(status="paused")
            ).rowcount
        return bool(moved)

    def unpause_run(self, run_id: str) -> bool:
        with self._write() as conn:
            moved = conn.execute(
                sa.update(t.runs).where(t.runs.c.id == run_id, t.runs.c.status == "paused").values(status="running")
            ).rowcount
        return bool(moved)

    def run_status(self, run_id: str) -> str | None:
        """Only the status: workers poll it between sends, so it must be cheap."""
        with self._read() as conn:
            return conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar_one_or_none()

    def cancel_claimed(self, ids: Sequence[int], actor: str) -> int:
        """Rows a worker claimed but had not handed to the gateway when the run was cancelled."""
        if not ids:
            return 0
        with self._write() as conn:
            return self._transition(
                conn,
                ids,
                SENDING,
                CANCELLED,
                actor=actor,
                reason="cancelled",
                values={"reason": "cancelled", "claim_token": None},
            )

    # ------------------------------------------------------------------ frequency cap

    def bulk_sends_since(
        self, phones: Sequence[str], since: datetime, exclude_run: str | None = None
    ) -> dict[str, int]:
        """How many bulk messages each phone was sent (or is being sent) since ``since``, across all runs."""
        if not phones:
            return {}
        d, r, res = t.deliveries, t.runs, t.residents
        # phone -> resident (unique index) -> deliveries (resident index): the delivery log is
        # indexed by resident, which is cheap to maintain at fan-out, rather than by phone
        where = [
            res.c.phone.in_(list(set(phones))),
            # a message another run has claimed but not yet recorded counts too: of two runs
            # checking the same person at once, each sees the other's claim (claims commit
            # before the check), so together they can fall short of the cap but never exceed it
            sa.or_(
                sa.and_(d.c.state.in_(CAPPED_STATES), d.c.sent_at >= since),
                sa.and_(d.c.state == SENDING, d.c.claimed_at >= since),
            ),
            r.c.priority == "bulk",
        ]
        if exclude_run:
            where.append(d.c.run_id != exclude_run)
        with self._read() as conn:
            return {
                phone: int(n)
                for phone, n in conn.execute(
                    select(res.c.phone, func.count())
                    .select_from(res.join(d, d.c.resident_id == res.c.id).join(r, r.c.id == d.c.run_id))
                    .where(*where)
                    .group_by(res.c.phone)
                )
            }

    # ------------------------------------------------------------------ scheduler fires

    def record_fire(
        self,
        campaign_id: str,
        fire_time: datetime,
        status: str,
        *,
        scheduler: str,
        run_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Remember one handled fire; False if it was recorded already (another leader, a retry)."""
        try:
            with self._write() as conn:
                conn.execute(
                    sa.insert(t.schedule_fires).values(
                        campaign_id=campaign_id,
                        fire_time=fire_time,
                        status=status,
                        run_id=run_id,
                        reason=reason,
                        scheduler=scheduler,
                        recorded_at=self.clock(),
                    )
                )
        except IntegrityError:
            return False
        return True

    def last_fire(self, campaign_id: str) -> datetime | None:
        with self._read() as conn:
            value = conn.execute(
                select(func.max(t.schedule_fires.c.fire_time)).where(t.schedule_fires.c.campaign_id == campaign_id)
            ).scalar_one()
        return _utc(value)

    def fire_recorded(self, campaign_id: str, fire_time: datetime) -> bool:
        f = t.schedule_fires
        with self._read() as conn:
            query = select(f.c.id).where(f.c.campaign_id == campaign_id, f.c.fire_time == fire_time)
            return conn.execute(query).first() is not None

    def list_fires(self, campaign_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        f = t.schedule_fires
        query = select(f).order_by(f.c.fire_time).limit(limit)
        if campaign_id:
            query = query.where(f.c.campaign_id == campaign_id)
        with self._read() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:
            row["fire_time"] = _utc(row["fire_time"])
            row["recorded_at"] = _utc(row["recorded_at"])
        return rows

    def run_for_fire(self, campaign_id: str, fire_time: datetime) -> str | None:
        with self._read() as conn:
            return conn.execute(
                select(t.runs.c.id).where(t.runs.c.campaign_id == campaign_id, t.runs.c.fire_time == fire_time)
            ).scalar_one_or_none()

    # ------------------------------------------------------------------ leader lease (no Redis)

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew the named lease; True while ``holder`` is the leader.

        Uses real time, not the business clock: a lease is about live processes.
        """
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=seconds)
        lease = t.scheduler_leases
        with self._write() as conn:
            moved = conn.execute(
                sa.update(lease)
                .where(lease.c.name == name, sa.or_(lease.c.holder == holder, lease.c.expires_at < now))
                .values(holder=holder, expires_at=expires)
            ).rowcount
            if moved:
                return True
            exists = conn.execute(select(lease.c.name).where(lease.c.name == name)).first()
            if exists:
                return False
            stmt = self._insert()(lease).values(name=name, holder=holder, expires_at=expires)
            stmt = stmt.on_conflict_do_nothing()
            return bool(conn.execute(stmt).rowcount)

    def release_lease(self, name: str, holder: str) -> None:
        lease = t.scheduler_leases
        with self._write() as conn:
            conn.execute(sa.delete(lease).where(lease.c.name == name, lease.c.holder == holder))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
