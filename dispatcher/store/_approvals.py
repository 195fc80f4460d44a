"""Two-person approval of campaign versions: the rows, and their events in the ledger's ``audit`` chain.

``dispatcher.approvals`` owns the rules (what a version is, who may approve, what the gate
refuses); this module keeps the rows. Every change (a submission, an approval, a refused
self-approval, a void) appends its event to the audit chain in the same transaction, so a
change without its event cannot be committed, and ``dispatch audit verify`` covers them.

A campaign has at most one *live* row (a partial unique index): the version submitted last,
until an edit makes another version current and the row is voided. A voided row stays voided
even if the files are edited back: the restored version is submitted and approved again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..errors import UsageError
from . import ledger
from . import schema as t
from ._db import Db
from ._rows import as_utc


@dataclass(frozen=True)
class ApprovalRow:
    id: int
    campaign_id: str
    version: str
    campaign_path: str
    submitted_by: str
    submitted_at: datetime
    approved_by: str | None
    approved_at: datetime | None
    voided_at: datetime | None
    voided_by_version: str | None


@dataclass(frozen=True)
class ApprovalState:
    """What the delivery log says of one campaign version: its live row (submitted or approved),
    and, when it has none, the row an edit voided last (None: never submitted)."""

    current: ApprovalRow | None
    voided: ApprovalRow | None


SubmitOutcome = Literal["submitted", "already_submitted", "already_approved"]
ApproveOutcome = Literal["approved", "already_approved", "not_submitted", "self_approval"]


def _row(values: Any) -> ApprovalRow:
    d = dict(values)
    for key in ("submitted_at", "approved_at", "voided_at"):
        d[key] = as_utc(d[key])
    return ApprovalRow(**d)


def _event(
    conn: Connection, kind: str, actor: str, payload: dict[str, Any], now: datetime, reason: str | None = None
) -> None:
    ledger.append(conn, ledger.AUDIT_CHAIN, [ledger.Event(kind, actor=actor, reason=reason, payload=payload)], now)


def _live(conn: Connection, campaign_id: str, *, lock: bool = False) -> ApprovalRow | None:
    a = t.campaign_approvals
    query = sa.select(a).where(a.c.campaign_id == campaign_id, a.c.voided_at.is_(None))
    if lock and conn.dialect.name != "sqlite":
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    return _row(row) if row else None


def still_approved(conn: Connection, campaign_id: str, version: str, approved_by: str) -> bool:
    """Inside a run's creating transaction: the approval the gate saw is still live (no edit voided it since)."""
    a = t.campaign_approvals
    query = sa.select(a.c.id).where(
        a.c.campaign_id == campaign_id,
        a.c.version == version,
        a.c.approved_by == approved_by,
        a.c.voided_at.is_(None),
    )
    if conn.dialect.name != "sqlite":
        query = query.with_for_update()  # an edit's void waits for the run, or the run sees the void
    return conn.execute(query).first() is not None


class Approvals:
    """Campaign version approvals; reached as ``store.approvals``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def _void_stale(self, conn: Connection, campaign_id: str, version: str, actor: str, now: datetime) -> None:
        """Void the campaign's live row if it is of another version (the files were edited), with its event."""
        live = _live(conn, campaign_id, lock=True)
        if live is None or live.version == version:
            return
        a = t.campaign_approvals
        conn.execute(sa.update(a).where(a.c.id == live.id).values(voided_at=now, voided_by_version=version))
        payload = {
            "campaign_id": campaign_id,
            "version": live.version,
            "current_version": version,
            "submitted_by": live.submitted_by,
            "approved_by": live.approved_by,
        }
        _event(conn, "approval.voided", actor, payload, now, reason="edited")

    def observe(self, campaign_id: str, version: str, *, actor: str) -> ApprovalState:
        """The state of ``version``, the campaign's current one; a live row of another version is voided
        first (recorded as ``approval.voided`` by ``actor``). Reads only, unless there is one to void."""
        with self._db.read() as conn:
            live = _live(conn, campaign_id)
        if live is not None and live.version != version:
            with self._db.write() as conn:
                self._void_stale(conn, campaign_id, version, actor, self._db.now())
        return self.state(campaign_id, version)

    def state(self, campaign_id: str, version: str) -> ApprovalState:
        a = t.campaign_approvals
        with self._db.read() as conn:
            live = _live(conn, campaign_id)
            if live is not None and live.version == version:
                return ApprovalState(live, None)
            voided = (
                conn.execute(
                    sa.select(a)
                    .where(a.c.campaign_id == campaign_id, a.c.voided_at.is_not(None))
                    .order_by(a.c.id.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        return ApprovalState(None, _row(voided) if voided else None)

    def submit(self, campaign_id: str, version: str, path: str, *, by: str) -> tuple[SubmitOutcome, ApprovalRow]:
        """Record ``by``'s submission of ``version`` (voiding a live row of an older version first)."""
        now = self._db.now()
        actor = f"operator:{by}"
        a = t.campaign_approvals
        try:
            with self._db.write() as conn:
                self._void_stale(conn, campaign_id, version, actor, now)
                live = _live(conn, campaign_id)
                if live is not None:
                    return ("already_approved" if live.approved_by else "already_submitted"), live
                conn.execute(
                    sa.insert(a).values(
                        campaign_id=campaign_id, version=version, campaign_path=path, submitted_by=by, submitted_at=now
                    )
                )
                payload = {"campaign_id": campaign_id, "version": version, "campaign_path": path}
                _event(conn, "approval.submitted", actor, payload, now)
                created = _live(conn, campaign_id)
        except IntegrityError as exc:  # PostgreSQL: another submission of the campaign committed first
            raise UsageError(
                f"campaign {campaign_id} was submitted by someone else at the same moment; see `dispatch approvals`",
                field="campaign",
            ) from exc
        assert created is not None
        return "submitted", created

    def approve(self, campaign_id: str, version: str, *, by: str) -> tuple[ApproveOutcome, ApprovalRow | None]:
        """Approve ``version`` as ``by``. Its author approving it is refused, and the refusal is recorded
        (committed: the caller reports it after this returns)."""
        now = self._db.now()
        actor = f"operator:{by}"
        a = t.campaign_approvals
        with self._db.write() as conn:
            self._void_stale(conn, campaign_id, version, actor, now)
            live = _live(conn, campaign_id, lock=True)
            if live is None:
                return "not_submitted", None
            if live.approved_by:
                return "already_approved", live
            payload = {"campaign_id": campaign_id, "version": version, "submitted_by": live.submitted_by}
            if live.submitted_by == by:
                _event(conn, "approval.refused", actor, payload, now, reason="self_approval")
                return "self_approval", live
            conn.execute(sa.update(a).where(a.c.id == live.id).values(approved_by=by, approved_at=now))
            _event(conn, "approval.approved", actor, payload, now)
            approved = _live(conn, campaign_id)
        return "approved", approved

    def history(self, campaign_id: str | None = None, limit: int = 100) -> list[ApprovalRow]:
        """Approval rows, newest first (voided ones included)."""
        a = t.campaign_approvals
        query = sa.select(a).order_by(a.c.id.desc()).limit(limit)
        if campaign_id is not None:
            query = query.where(a.c.campaign_id == campaign_id)
        with self._db.read() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]
