"""Delivery-log changes that come from providers after the hand-over: two operation groups of the store.

``ProviderEvents`` (``store.provider_events``):

- ``apply_status``: a status callback or delivery report moves a row *forward only*
  (``sent`` -> ``delivered``); a late or replayed ``sent`` never overwrites
  ``delivered``, and a repeat changes nothing.
- ``unknown_rows`` / ``settle_unknown``: rows an ambiguous reply (5xx, read timeout)
  left in ``unknown`` are settled from the gateway's ``lookup``: found -> ``sent``
  with the provider's id; not found -> back to ``pending`` for another attempt.
- ``awaiting_report`` / ``mark_unconfirmed``: rows ``sent`` whose final report never
  came; what the provider says when asked goes through ``apply_status`` like any
  report, and rows still ``sent`` at the deadline become ``unconfirmed``.

``Ringback`` (``store.ringback``): what an enrolment changed at the carrier (first write
wins) and the restore run that puts those numbers back.

Every state change here is written in one transaction with its ledger event, as
``record`` does, so the hash-chained ledger sees every move a callback makes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.engine import Connection

from ..keys import delivery_key_prefix
from . import _leases as leases
from . import ledger
from . import schema as t
from ._db import Db
from ._rows import as_utc, insert_run, keys_digest, transition
from .base import DELIVERED, FAILED, PENDING, SENDING, SENT, UNCONFIRMED, UNDELIVERED, UNKNOWN, CreatedRun, UnknownRow
from .ledger import Event, append_by_run

#: provider status words -> our state
PROVIDER_STATES: dict[str, str] = {
    "accepted": SENT,
    "scheduled": SENT,
    "queued": SENT,
    "sending": SENT,
    "sent": SENT,
    "delivered": DELIVERED,
    "read": DELIVERED,
    "undelivered": UNDELIVERED,
    "failed": FAILED,
    "canceled": FAILED,
}
#: how far along a row is; a report may only move a row to a higher rank. ``unconfirmed`` sits between
#: ``sent`` and the final states: a late ``sent`` or ``queued`` leaves it alone, a late final report wins
_RANK = {PENDING: 0, SENDING: 0, UNKNOWN: 0, SENT: 1, UNCONFIRMED: 2, DELIVERED: 3, UNDELIVERED: 3, FAILED: 3}


@dataclass(frozen=True)
class AwaitingReport:
    """A row handed over (``sent``) whose final delivery report has not come."""

    id: int
    run_id: str
    provider_id: str
    gateway: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class StateChange:
    run_id: str
    delivery_id: int
    key: str
    from_state: str
    to_state: str
    provider_id: str | None = None
    error_code: str | None = None
    reason: str | None = None
    #: the adapter the row went through, when it was handed over, and when this change was made:
    #: what the delivery-report lag is measured from
    gateway: str | None = None
    sent_at: datetime | None = None
    at: datetime | None = None


class ProviderEvents:
    """Status callbacks and reconciliation of ``unknown`` rows over one ``Db``.

    ``reporter_gateways`` limits a reporter's word to its own adapters' rows (actor ->
    gateway names, as each provider declares in ``reports_for``): a delivery report signed
    with one provider's secret may move only rows that provider sent. The mapping is handed
    in because the store knows no providers.
    """

    def __init__(self, db: Db, reporter_gateways: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self._db = db
        self._reporter_gateways: Mapping[str, tuple[str, ...]] = dict(reporter_gateways or {})

    def _ledger_changes(self, conn: Connection, changes: Sequence[StateChange], actor: str, now: datetime) -> None:
        """Append one ledger event per state change, inside the caller's transaction.

        ``now`` is the instant the caller stamped its attempt rows with: ``audit verify`` pairs
        each attempt with its event by that instant, so a second reading of a running clock
        would leave every reported attempt looking like a hand-over missing from the ledger.
        """
        if not changes:
            return
        events = (
            (
                c.run_id,
                Event(
                    kind="delivery.state",
                    key=c.key,
                    delivery_id=c.delivery_id,
                    from_state=c.from_state,
                    to_state=c.to_state,
                    provider_id=c.provider_id,
                    error_code=c.error_code,
                    reason=c.reason,
                    actor=actor,
                ),
            )
            for c in changes
        )
        append_by_run(conn, events, now)

    def apply_status(
        self, provider_id: str, status: str, *, error_code: str | None = None, actor: str = "provider"
    ) -> list[StateChange]:
        """Move the rows holding ``provider_id`` forward to what ``status`` means; returns what changed.

        An ``actor`` listed in the reporter mapping moves only rows sent through its adapters
        (a report authenticated by one provider's secret says nothing about another's messages).

        A callback can overtake our own bookkeeping: Twilio may report ``sent`` for the first
        message of a batch before the batch has recorded its SIDs. A report for an id no row
        holds yet is kept in ``status_backlog`` and applied by the next report that comes in
        (or by ``drain_status_backlog``) once the row has its id, so no final status is lost.
        """
        if PROVIDER_STATES.get(status.strip().lower()) is None or not provider_id:
            return []
        now = self._db.now()
        with self._db.write() as conn:
            self._drain(conn, now)
            mine, known = self._apply_one(conn, provider_id, status, error_code, actor, now)
            if not known:
                conn.execute(
                    sa.insert(t.status_backlog).values(
                        provider_id=provider_id,
                        status=status,
                        error_code=error_code,
                        actor=actor,
                        received_at=now,
                    )
                )
            self._ledger_changes(conn, mine, actor, now)
        return mine

    def apply_statuses(self, reports: Sequence[tuple[str, str, str | None]], *, actor: str) -> list[StateChange]:
        """Several (provider id, status, error code) reports in one transaction, each applied exactly as
        ``apply_status`` applies one (``_apply_one``: forward only, an attempt row and a ledger event per
        change). For what the delivery-report sweep learns by asking: one transaction per answer made a
        large run's sweep crawl. An id no row holds is dropped, not kept: the sweep only asks about ids
        rows hold."""
        usable = [r for r in reports if r[0] and PROVIDER_STATES.get(r[1].strip().lower()) is not None]
        if not usable:
            return []
        now = self._db.now()
        changes: list[StateChange] = []
        with self._db.write() as conn:
            for provider_id, status, error_code in usable:
                changes += self._apply_one(conn, provider_id, status, error_code, actor, now)[0]
            self._ledger_changes(conn, changes, actor, now)
        return changes

    def drain_status_backlog(self) -> list[StateChange]:
        """Apply kept reports whose rows now hold the provider id (``record``, ``resume`` and every report
        call it)."""
        with self._db.read_one() as conn:
            if conn.execute(select(t.status_backlog.c.id).limit(1)).first() is None:
                return []  # the usual case, checked without taking the writer (every recorded batch asks)
        now = self._db.now()
        with self._db.write() as conn:
            return self._drain(conn, now)

    def _drain(self, conn: Connection, now: datetime) -> list[StateChange]:
        """Apply the kept reports whose rows now hold their ids; each change is in the ledger under the
        actor who reported it, whoever happens to drain it."""
        b, d = t.status_backlog, t.deliveries
        pending = conn.execute(
            select(b.c.id, b.c.provider_id, b.c.status, b.c.error_code, b.c.actor)
            .where(sa.exists().where(d.c.provider_id == b.c.provider_id))
            .order_by(b.c.id)
        ).all()
        changes: list[StateChange] = []
        for item in pending:
            applied = self._apply_one(conn, item.provider_id, item.status, item.error_code, item.actor, now)[0]
            self._ledger_changes(conn, applied, item.actor, now)
            changes += applied
            conn.execute(sa.delete(b).where(b.c.id == item.id))
        # reports for ids that never turn up (another system's messages) are not kept for ever
        conn.execute(sa.delete(b).where(b.c.received_at < now - timedelta(days=7)))
        return changes

    def _apply_one(
        self,
        conn: Connection,
        provider_id: str,
        status: str,
        error_code: str | None,
        actor: str,
        now: datetime,
    ) -> tuple[list[StateChange], bool]:
        """Apply one report inside ``conn``; returns (changes, whether any row holds the id)."""
        target = PROVIDER_STATES[status.strip().lower()]
        d = t.deliveries
        lower = [s for s, rank in _RANK.items() if rank < _RANK[target]]
        query = select(d.c.id, d.c.run_id, d.c.key, d.c.state, d.c.attempts, d.c.gateway, d.c.sent_at).where(
            d.c.provider_id == provider_id
        )
        gateways = self._reporter_gateways.get(actor)
        if gateways is not None:
            query = query.where(d.c.gateway.in_(gateways))
        rows = conn.execute(query).all()
        changes: list[StateChange] = []
        for row in rows:
            if row.state not in lower:
                continue  # already as far or further: a late or repeated report changes nothing
            values: dict[str, Any] = {"state": target, "updated_at": now}
            if target in (UNDELIVERED, FAILED):
                values.update(error_code=error_code or f"status.{status}", reason="provider_status")
            if row.state != SENT and target == SENT:
                values["sent_at"] = now
            done = conn.execute(sa.update(d).where(d.c.id == row.id, d.c.state == row.state).values(**values)).rowcount
            if not done:
                continue
            change = StateChange(
                row.run_id, row.id, row.key, row.state, target, provider_id, error_code, "provider_status",
                gateway=row.gateway, sent_at=as_utc(row.sent_at), at=now,
            )  # fmt: skip
            changes.append(change)
            conn.execute(
                sa.insert(t.attempts).values(
                    delivery_id=row.id,
                    run_id=row.run_id,
                    attempt=row.attempts,
                    gateway=row.gateway or actor,
                    outcome="callback",
                    provider_id=provider_id,
                    error_code=error_code,
                    error_message=f"status {status}",
                    at=now,
                )
            )
        return changes, bool(rows)

    def state_of(self, provider_id: str) -> list[str]:
        """States of the rows holding ``provider_id`` (for status pages and tests)."""
        d = t.deliveries
        with self._db.read() as conn:
            return [s for (s,) in conn.execute(select(d.c.state).where(d.c.provider_id == provider_id))]

    def unknown_rows(self, run_id: str) -> list[UnknownRow]:
        """Rows left ``unknown`` by an ambiguous reply, with what a lookup needs (number, text, when)."""
        d = t.deliveries
        with self._db.read() as conn:
            rows = conn.execute(
                select(d.c.id, d.c.key, d.c.phone, d.c.body, d.c.attempts, d.c.claimed_at, d.c.updated_at)
                .where(d.c.run_id == run_id, d.c.state == UNKNOWN)
                .order_by(d.c.id)
            )
            return [
                UnknownRow(
                    id=r.id,
                    key=r.key,
                    phone=r.phone,
                    body=r.body,
                    attempts=r.attempts,
                    claimed_at=as_utc(r.claimed_at),
                    updated_at=as_utc(r.updated_at),
                )
                for r in rows
            ]

    def settle_unknown(
        self, run_id: str, found: dict[int, str], not_found: Sequence[int], *, gateway: str
    ) -> tuple[int, int]:
        """``unknown`` rows the provider has -> ``sent`` (with its id); the rest go back to ``pending``."""
        d = t.deliveries
        now = self._db.now()
        changes: list[StateChange] = []
        with self._db.write() as conn:
            keys = {
                row.id: (row.key, row.attempts)
                for row in conn.execute(
                    select(d.c.id, d.c.key, d.c.attempts).where(d.c.id.in_([*found, *not_found]), d.c.state == UNKNOWN)
                )
            }
            for delivery_id, provider_id in found.items():
                if delivery_id not in keys:
                    continue
                conn.execute(
                    sa.update(d)
                    .where(d.c.id == delivery_id, d.c.state == UNKNOWN)
                    .values(state=SENT, provider_id=provider_id, reason="reconciled", sent_at=now, updated_at=now)
                )
                key, attempts = keys[delivery_id]
                changes.append(StateChange(run_id, delivery_id, key, UNKNOWN, SENT, provider_id, None, "reconciled"))
                conn.execute(
                    sa.insert(t.attempts).values(
                        delivery_id=delivery_id,
                        run_id=run_id,
                        attempt=attempts,
                        gateway=gateway,
                        outcome="found",
                        provider_id=provider_id,
                        at=now,
                    )
                )
            for delivery_id in not_found:
                if delivery_id not in keys:
                    continue
                conn.execute(
                    sa.update(d)
                    .where(d.c.id == delivery_id, d.c.state == UNKNOWN)
                    .values(
                        state=PENDING,
                        claim_token=None,
                        next_attempt_at=None,
                        reason="not_at_provider",
                        updated_at=now,
                    )
                )
                changes.append(
                    StateChange(
                        run_id,
                        delivery_id,
                        keys[delivery_id][0],
                        UNKNOWN,
                        PENDING,
                        None,
                        None,
                        "not_at_provider",
                    )
                )
            self._ledger_changes(conn, changes, "reconcile", now)
        found_n = sum(1 for c in changes if c.to_state == SENT)
        return found_n, len(changes) - found_n

    def mark_unknown(
        self,
        run_id: str,
        ids: Sequence[int],
        *,
        reason: str,
        seen: Mapping[int, tuple[str | None, datetime | None]] | None = None,
    ) -> int:
        """Rows left in ``sending`` that nobody can look up become ``unknown`` (an operator decides).

        With ``seen`` (each row's claim token and ``claimed_at`` as the orphan list read them), a row
        re-claimed or renewed by its worker since is left to that worker.
        """
        if not ids:
            return 0
        d = t.deliveries
        now = self._db.now()
        with self._db.write() as conn:
            rows = conn.execute(
                select(d.c.id, d.c.key).where(d.c.id.in_(list(ids)), d.c.run_id == run_id, d.c.state == SENDING)
            ).all()
            changes = []
            for row in rows:
                fence: list[Any] = []
                if seen is not None and row.id in seen:
                    token, claimed_at = seen[row.id]
                    fence.append(d.c.claim_token.is_(None) if token is None else d.c.claim_token == token)
                    fence.append(d.c.claimed_at.is_(None) if claimed_at is None else d.c.claimed_at == claimed_at)
                done = conn.execute(
                    sa.update(d)
                    .where(d.c.id == row.id, d.c.state == SENDING, *fence)
                    .values(state=UNKNOWN, reason=reason, claim_token=None, updated_at=now)
                ).rowcount
                if done:
                    changes.append(StateChange(run_id, row.id, row.key, SENDING, UNKNOWN, None, None, reason))
            self._ledger_changes(conn, changes, "resume", now)
        return len(changes)

    # ------------------------------------------------------------------ chasing delivery reports

    def runs_awaiting_reports(self, sent_before: datetime) -> list[str]:
        """SMS runs with a row ``sent`` before ``sent_before`` and still without a final report, oldest first.

        Ringback enrolments have no delivery reports: their ``sent`` is final.

        One EXISTS per run over the (run, state) index: no scan of every delivery row.
        """
        r, d = t.runs, t.deliveries
        waiting = sa.exists().where(d.c.run_id == r.c.id, d.c.state == SENT, _handed_over_at(d) < sent_before)
        with self._db.read() as conn:
            query = select(r.c.id).where(r.c.channel == "sms", waiting).order_by(r.c.created_at)
            return [run_id for (run_id,) in conn.execute(query)]

    def awaiting_report(
        self, run_id: str, sent_before: datetime, *, after_id: int = 0, limit: int = 500
    ) -> list[AwaitingReport]:
        """Rows of an SMS run ``sent`` before ``sent_before`` with a provider id, in id order from ``after_id``."""
        d = t.deliveries
        query = (
            select(d.c.id, d.c.run_id, d.c.provider_id, d.c.gateway, _handed_over_at(d).label("at"))
            .where(
                _sms_run(run_id),
                d.c.run_id == run_id,
                d.c.state == SENT,
                _handed_over_at(d) < sent_before,
                d.c.provider_id.is_not(None),
                d.c.id > after_id,
            )
            .order_by(d.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [
                AwaitingReport(row.id, row.run_id, row.provider_id, row.gateway, as_utc(row.at))
                for row in conn.execute(query)
            ]

    def mark_unconfirmed(self, run_id: str, sent_before: datetime, *, reason: str, actor: str) -> int:
        """Rows of an SMS run still ``sent`` that were handed over before ``sent_before`` -> ``unconfirmed``.

        The update is conditional on the row still being ``sent``, in the transaction that
        writes its ledger event: a report that lands first wins, and two sweeps (an old and a
        new leader, the scheduler and ``dispatch reconcile``) cannot mark a row twice.
        """
        d = t.deliveries
        now = self._db.now()
        with self._db.write() as conn:
            ids = [
                i
                for (i,) in conn.execute(
                    select(d.c.id)
                    .where(_sms_run(run_id), d.c.run_id == run_id, d.c.state == SENT, _handed_over_at(d) < sent_before)
                    .order_by(d.c.id)
                )
            ]
            return transition(
                conn,
                now,
                ids,
                SENT,
                UNCONFIRMED,
                actor=actor,
                reason=reason,
                values={"reason": "no_final_report", "error_code": "dlr.deadline"},
            )


class Ringback:
    """What a ringback enrolment changed at the carrier, and the restore runs that put it back, over one ``Db``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def create_restore_run(self, spec: Any, enrol_run_id: str, states: Sequence[str]) -> CreatedRun:
        """A run whose rows are the numbers an enrol run may have changed (``states``), to put them back.

        Written like ``create_run``: run snapshot, one row per number with its own idempotency
        key, and the ledger head, in one transaction. Opted-out people are restored too: restoring
        undoes what we did to their number.
        """
        now = self._db.now()
        d = t.deliveries
        batch_no = (sa.func.row_number().over(order_by=d.c.id) - 1) // spec.batch_size
        selection = select(
            sa.literal(spec.run_id),
            sa.literal(delivery_key_prefix(spec.run_id)) + d.c.phone,
            d.c.resident_id,
            d.c.phone,
            d.c.district,
            d.c.grid,
            batch_no,
            sa.literal(PENDING),
            sa.literal(0),
            sa.literal(now, sa.DateTime(timezone=True)),
            sa.literal(now, sa.DateTime(timezone=True)),
        ).where(d.c.run_id == enrol_run_id, d.c.state.in_(list(states)))
        columns = [
            "run_id",
            "key",
            "resident_id",
            "phone",
            "district",
            "grid",
            "batch_no",
            "state",
            "attempts",
            "created_at",
            "updated_at",
        ]
        with self._db.write() as conn:
            if SENDING in states:
                # a batch still leased (a worker handing it over as the window closed) may have changed
                # numbers too: its rows go to ``sending`` first, so they are selected
                leases.materialize_run(conn, enrol_run_id, now)
            insert_run(conn, spec, now)
            conn.execute(sa.insert(d).from_select(columns, selection))
            total = int(conn.execute(select(sa.func.count()).where(d.c.run_id == spec.run_id)).scalar_one())
            batches = -(-total // spec.batch_size)
            digest = keys_digest(conn, spec.run_id, is_sqlite=self._db.is_sqlite)
            payload = {
                "campaign_id": spec.campaign_id,
                "campaign_sha256": spec.campaign_sha256,
                "template_name": spec.template_name,
                "template_sha256": spec.template_sha256,
                "fire_time": spec.fire_time.isoformat() if spec.fire_time else None,
                "total": total,
                "pending": total,
                "keys_sha256": digest,
                "restores": enrol_run_id,
            }
            ledger.open_run(conn, spec.run_id, ledger.Event(kind="run.created", actor=spec.actor, payload=payload), now)
            conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == spec.run_id)
                .values(
                    total=total,
                    batches=batches,
                    status="running" if total else "completed",
                    finished_at=None if total else now,
                )
            )
        return CreatedRun(spec.run_id, total, total, batches)

    def keep_ringback(self, run_id: str, phone: str, provider_id: str, kept: Any) -> None:
        """Remember what an enrolment changed, so the restore run can put it back (first write wins)."""
        r = t.ringback_numbers
        with self._db.write() as conn:
            exists = conn.execute(select(r.c.phone).where(r.c.run_id == run_id, r.c.phone == phone)).first()
            if exists is None:
                conn.execute(
                    sa.insert(r).values(
                        run_id=run_id,
                        phone=phone,
                        provider_id=provider_id,
                        kept=json.dumps(kept, ensure_ascii=False) if kept is not None else None,
                        enrolled_at=self._db.now(),
                    )
                )

    def ringback_kept(self, run_id: str, phone: str) -> dict[str, Any] | None:
        r = t.ringback_numbers
        with self._db.read() as conn:
            value = conn.execute(select(r.c.kept).where(r.c.run_id == run_id, r.c.phone == phone)).scalar()
        return dict(json.loads(value)) if value else None


def _handed_over_at(d: sa.Table) -> Any:
    """When a row was handed over: ``sent_at``, or its last update for rows written before it was kept."""
    return sa.func.coalesce(d.c.sent_at, d.c.updated_at)


def _sms_run(run_id: str) -> Any:
    """The run sends SMS: ringback enrolments have no delivery reports, their ``sent`` is final."""
    return sa.exists().where(t.runs.c.id == run_id, t.runs.c.channel == "sms")
