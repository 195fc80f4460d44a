"""Early-warning alerts: the alert rows, their escalation steps, the roster, API keys and each alert's chain.

``dispatcher.alerting`` decides what to send and when; the rows and their atomic moves live here. A step
fires with one conditional UPDATE (``due`` -> ``fired``) in the same transaction that creates its run and
appends ``alert.step`` to the alert's chain, so a step whose run exists was fired exactly once, and a step
still ``due`` after a crash is fired by whoever leads next.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..errors import UsageError
from ..phones import mask
from ..redact import scrub_optional
from . import ledger
from . import schema as t
from ._db import Db
from ._rows import as_utc, insert_direct_run
from .base import DirectRecipient, RunSpec

DUE, FIRED, CANCELLED_STEP, SKIPPED_STEP = "due", "fired", "cancelled", "skipped"


@dataclass(frozen=True)
class NewAlert:
    id: str
    external_id: str | None
    phone: str
    name: str
    fraud_type: str
    source: str | None
    district: str
    grid: str
    actor: str


@dataclass(frozen=True)
class AlertRecord:
    id: str
    external_id: str | None
    phone: str
    name: str
    fraud_type: str
    source: str | None
    district: str
    grid: str
    status: str
    outcome: str | None
    note: str | None
    actor: str
    created_at: datetime
    first_contact_at: datetime | None
    confirmed_at: datetime | None
    closed_at: datetime | None


@dataclass(frozen=True)
class AlertStep:
    id: int
    alert_id: str
    seq: int
    action: str
    due_at: datetime
    state: str
    run_id: str | None
    fired_at: datetime | None
    fired_by: str | None
    detail: str | None


@dataclass(frozen=True)
class Milestone:
    name: str
    at: datetime


@dataclass(frozen=True)
class RosterEntry:
    grid: str
    role: str
    name: str
    phone: str


_ALERT_TIMES = ("created_at", "first_contact_at", "confirmed_at", "closed_at")


def _alert(row: Any) -> AlertRecord:
    values = dict(row)
    for key in _ALERT_TIMES:
        values[key] = as_utc(values[key])
    return AlertRecord(**values)


def _step(row: Any) -> AlertStep:
    values = dict(row)
    values["due_at"] = as_utc(values["due_at"])
    values["fired_at"] = as_utc(values["fired_at"])
    return AlertStep(**values)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


#: delivery events of an alert's runs that become milestones of the alert (run state -> milestone suffix)
_MILESTONE_STATES = {"sent": "sent", "delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}


class Alerts:
    """Alerts and their escalation; reached as ``store.alerts``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    # ------------------------------------------------------------------ intake

    def create(self, alert: NewAlert, steps: Sequence[tuple[str, datetime]]) -> tuple[AlertRecord, bool]:
        """Write the alert, its steps and the head of its chain; an external id seen before creates nothing.

        Returns the alert and whether it was created now (False: the existing one for that external id).
        """
        if alert.external_id:
            found = self.by_external_id(alert.external_id)
            if found is not None:
                return found, False
        now = self._db.now()
        try:
            with self._db.write() as conn:
                conn.execute(
                    sa.insert(t.alerts).values(
                        id=alert.id,
                        external_id=alert.external_id,
                        phone=alert.phone,
                        name=alert.name,
                        fraud_type=alert.fraud_type,
                        source=scrub_optional(alert.source),
                        district=alert.district,
                        grid=alert.grid,
                        status="open",
                        actor=alert.actor,
                        created_at=now,
                    )
                )
                conn.execute(
                    sa.insert(t.alert_steps),
                    [
                        {"alert_id": alert.id, "seq": i, "action": action, "due_at": due, "state": DUE}
                        for i, (action, due) in enumerate(steps)
                    ],
                )
                payload = {
                    "external_id": alert.external_id,
                    "phone": mask(alert.phone),
                    "fraud_type": alert.fraud_type,
                    "district": alert.district,
                    "grid": alert.grid,
                    "steps": [[action, due.isoformat()] for action, due in steps],
                }
                self._chain(conn, alert.id, "alert.created", alert.actor, payload, now)
        except IntegrityError:
            # the same external id posted twice at the same moment: the other request created it
            if alert.external_id:
                found = self.by_external_id(alert.external_id)
                if found is not None:
                    return found, False
            raise
        return self.get(alert.id), True

    @staticmethod
    def _chain(conn: Connection, alert_id: str, kind: str, actor: str, payload: dict[str, Any], at: datetime) -> None:
        ledger.append(conn, ledger.alert_chain(alert_id), [ledger.Event(kind, actor=actor, payload=payload)], at)

    # ------------------------------------------------------------------ reads

    def get(self, alert_id: str) -> AlertRecord:
        with self._db.read() as conn:
            row = conn.execute(sa.select(t.alerts).where(t.alerts.c.id == alert_id)).mappings().first()
        if row is None:
            raise UsageError(f"no alert with id {alert_id!r} (see `dispatch alerts`)", field="alert")
        return _alert(row)

    def by_external_id(self, external_id: str) -> AlertRecord | None:
        with self._db.read() as conn:
            row = conn.execute(sa.select(t.alerts).where(t.alerts.c.external_id == external_id)).mappings().first()
        return _alert(row) if row is not None else None

    def recent(self, *, open_only: bool = False, limit: int = 200) -> list[AlertRecord]:
        query = sa.select(t.alerts).order_by(t.alerts.c.created_at.desc(), t.alerts.c.id.desc()).limit(limit)
        if open_only:
            query = query.where(t.alerts.c.status == "open")
        with self._db.read() as conn:
            return [_alert(row) for row in conn.execute(query).mappings()]

    def created_between(self, since: datetime, until: datetime) -> list[AlertRecord]:
        a = t.alerts
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(a).where(a.c.created_at >= since, a.c.created_at < until).order_by(a.c.created_at)
            ).mappings()
            return [_alert(row) for row in rows]

    def steps(self, alert_id: str) -> list[AlertStep]:
        s = t.alert_steps
        with self._db.read() as conn:
            rows = conn.execute(sa.select(s).where(s.c.alert_id == alert_id).order_by(s.c.seq)).mappings()
            return [_step(row) for row in rows]

    def milestones(self, alert_id: str) -> list[Milestone]:
        m = t.alert_milestones
        with self._db.read() as conn:
            rows = conn.execute(sa.select(m.c.name, m.c.at).where(m.c.alert_id == alert_id).order_by(m.c.at))
            return [Milestone(name, as_utc(at) or at) for name, at in rows]

    def chain_ids(self) -> list[str]:
        """Every alert's chain id, oldest alert first (what ``dispatch audit verify`` walks)."""
        with self._db.read() as conn:
            ids = conn.execute(sa.select(t.alerts.c.id).order_by(t.alerts.c.created_at, t.alerts.c.id)).scalars()
            return [ledger.alert_chain(i) for i in ids]

    def chain_events(self, alert_id: str) -> list[dict[str, Any]]:
        e = t.events
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(e.c.seq, e.c.kind, e.c.actor, e.c.at, e.c.payload)
                .where(e.c.run_id == ledger.alert_chain(alert_id))
                .order_by(e.c.seq)
            ).mappings()
            return [{**dict(r), "at": as_utc(r["at"]), "payload": json.loads(r["payload"] or "{}")} for r in rows]

    # ------------------------------------------------------------------ firing

    def due_steps(self, now: datetime, limit: int = 100, alert_id: str | None = None) -> list[AlertStep]:
        """Steps due by ``now`` of alerts still open (or of one alert), oldest due first."""
        s, a = t.alert_steps, t.alerts
        where = [s.c.state == DUE, s.c.due_at <= now, a.c.status == "open"]
        if alert_id is not None:
            where.append(s.c.alert_id == alert_id)
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(s)
                .select_from(s.join(a, a.c.id == s.c.alert_id))
                .where(*where)
                .order_by(s.c.due_at, s.c.id)
                .limit(limit)
            ).mappings()
            return [_step(row) for row in rows]

    def next_due_at(self) -> datetime | None:
        s = t.alert_steps
        with self._db.read() as conn:
            return as_utc(conn.execute(sa.select(sa.func.min(s.c.due_at)).where(s.c.state == DUE)).scalar())

    def fire_step(
        self,
        step: AlertStep,
        *,
        actor: str,
        spec: RunSpec | None,
        recipients: Sequence[DirectRecipient] = (),
        detail: str | None = None,
    ) -> bool:
        """Take the step (``due`` -> ``fired``, or ``skipped`` without a run) and create its run, atomically.

        False when the step was no longer due (fired by another leader, cancelled by a confirmation):
        then nothing is written.
        """
        s = t.alert_steps
        now = self._db.now()
        with self._db.write() as conn:
            moved = conn.execute(
                sa.update(s)
                .where(s.c.id == step.id, s.c.state == DUE)
                .values(
                    state=FIRED if spec is not None else SKIPPED_STEP,
                    run_id=spec.run_id if spec is not None else None,
                    fired_at=now,
                    fired_by=actor,
                    detail=scrub_optional(detail),
                )
            ).rowcount
            if not moved:
                return False
            total = 0
            if spec is not None:
                total, _batches = insert_direct_run(conn, spec, recipients, now, is_sqlite=self._db.is_sqlite)
            payload: dict[str, Any] = {
                "seq": step.seq,
                "action": step.action,
                "due_at": step.due_at.isoformat(),
                "run_id": spec.run_id if spec is not None else None,
                "recipients": total,
            }
            if detail:
                payload["detail"] = scrub_optional(detail)
            kind = "alert.step" if spec is not None else "alert.step_skipped"
            self._chain(conn, step.alert_id, kind, actor, payload, now)
        return True

    def cancel_steps(self, alert_id: str, *, actor: str, why: str, conn: Connection | None = None) -> int:
        """Cancel every step of the alert still due, with one chain event; returns how many."""
        if conn is None:
            with self._db.write() as c:
                return self.cancel_steps(alert_id, actor=actor, why=why, conn=c)
        s = t.alert_steps
        now = self._db.now()
        cancelled = (
            conn.execute(
                sa.update(s)
                .where(s.c.alert_id == alert_id, s.c.state == DUE)
                .values(state=CANCELLED_STEP, detail=why, fired_at=now, fired_by=actor)
                .returning(s.c.seq)
            )
            .scalars()
            .all()
        )
        if cancelled:
            self._chain(conn, alert_id, "alert.steps_cancelled", actor, {"why": why, "seqs": sorted(cancelled)}, now)
        return len(cancelled)

    # ------------------------------------------------------------------ what the runs did

    def observe(self, actor: str) -> list[str]:
        """Turn what the open alerts' runs did into milestones of the alerts, each once, in their chains.

        A delivery moving to sent/delivered/undelivered/failed becomes ``<action><seq>.<state>``
        (``sms0.delivered``, ``call1.delivered`` = answered), a key press (``delivery.confirmed``)
        becomes ``call<seq>.confirmed``. The first contact (an SMS delivered or a call answered)
        and the confirmation are stamped on the alert. Returns the ids of alerts newly confirmed.
        """
        s, a, e, m = t.alert_steps, t.alerts, t.events, t.alert_milestones
        relevant = sa.or_(
            sa.and_(e.c.kind == "delivery.state", e.c.to_state.in_(tuple(_MILESTONE_STATES))),
            e.c.kind == "delivery.confirmed",
        )
        seen = sa.exists().where(
            m.c.alert_id == s.c.alert_id,
            m.c.name
            == s.c.action
            + sa.cast(s.c.seq, sa.String)
            + "."
            + sa.case((e.c.kind == "delivery.confirmed", "confirmed"), else_=e.c.to_state),
        )
        steps = s.join(a, a.c.id == s.c.alert_id).join(e, e.c.run_id == s.c.run_id)
        with self._db.read() as conn:
            found = [
                (event_id, *row)
                for event_id, *row in conn.execute(
                    sa.select(e.c.id, s.c.alert_id, s.c.seq, s.c.action, e.c.kind, e.c.to_state, e.c.at)
                    .select_from(steps)
                    .where(a.c.status == "open", s.c.run_id.is_not(None), relevant, ~seen)
                )
            ]
            # a worker's results are one event per batch: each row it names is a state change of its own
            for event_id, alert_id, seq, action, kind, from_state, at, payload in conn.execute(
                sa.select(e.c.id, s.c.alert_id, s.c.seq, s.c.action, e.c.kind, e.c.from_state, e.c.at, e.c.payload)
                .select_from(steps)
                .where(a.c.status == "open", s.c.run_id.is_not(None), e.c.kind == ledger.RECORD_KIND)
            ):
                for state in sorted({str(c.to_state) for c in ledger.row_changes(kind, from_state, None, payload)}):
                    if state in _MILESTONE_STATES:
                        found.append((event_id, alert_id, seq, action, "delivery.state", state, at))
        found = [row[1:] for row in sorted(found, key=lambda row: row[0])]
        if not found:
            return []
        confirmed: list[str] = []
        now = self._db.now()
        insert = self._db.insert()
        with self._db.write() as conn:
            for alert_id, seq, action, kind, to_state, at in found:
                suffix = "confirmed" if kind == "delivery.confirmed" else to_state
                name = f"{action}{seq}.{suffix}"
                at = as_utc(at) or now
                added = conn.execute(
                    insert(m).values(alert_id=alert_id, name=name, at=at).on_conflict_do_nothing()
                ).rowcount
                if not added:
                    continue
                self._chain(conn, alert_id, "alert.milestone", actor, {"milestone": name, "at": at.isoformat()}, now)
                if suffix == "delivered" or suffix == "confirmed":
                    conn.execute(
                        sa.update(a)
                        .where(a.c.id == alert_id, sa.or_(a.c.first_contact_at.is_(None), a.c.first_contact_at > at))
                        .values(first_contact_at=at)
                    )
                if suffix == "confirmed":
                    got = conn.execute(
                        sa.update(a).where(a.c.id == alert_id, a.c.confirmed_at.is_(None)).values(confirmed_at=at)
                    ).rowcount
                    if got:
                        confirmed.append(alert_id)
                        self.cancel_steps(alert_id, actor=actor, why="confirmed", conn=conn)
        return confirmed

    # ------------------------------------------------------------------ closing

    def close(self, alert_id: str, *, outcome: str, note: str | None, actor: str) -> AlertRecord:
        a = t.alerts
        now = self._db.now()
        with self._db.write() as conn:
            moved = conn.execute(
                sa.update(a)
                .where(a.c.id == alert_id, a.c.status == "open")
                .values(status="closed", outcome=outcome, note=scrub_optional(note), closed_at=now)
            ).rowcount
            if not moved:
                exists = conn.execute(sa.select(a.c.status).where(a.c.id == alert_id)).scalar()
                if exists is None:
                    raise UsageError(f"no alert with id {alert_id!r} (see `dispatch alerts`)", field="alert")
                raise UsageError(f"alert {alert_id} is already closed", field="alert")
            self.cancel_steps(alert_id, actor=actor, why="closed", conn=conn)
            self._chain(conn, alert_id, "alert.closed", actor, {"outcome": outcome, "note": scrub_optional(note)}, now)
        return self.get(alert_id)

    # ------------------------------------------------------------------ roster

    def roster_upsert(self, entries: Sequence[RosterEntry]) -> int:
        if not entries:
            return 0
        now = self._db.now()
        insert = self._db.insert()
        r = t.roster
        with self._db.write() as conn:
            for e in entries:
                stmt = insert(r).values(grid=e.grid, role=e.role, phone=e.phone, name=e.name, updated_at=now)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[r.c.grid, r.c.role, r.c.phone], set_={"name": e.name, "updated_at": now}
                    )
                )
        return len(entries)

    def roster_for(self, grid: str) -> list[RosterEntry]:
        r = t.roster
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(r.c.grid, r.c.role, r.c.name, r.c.phone).where(r.c.grid == grid).order_by(r.c.role, r.c.phone)
            )
            return [RosterEntry(*row) for row in rows]

    # ------------------------------------------------------------------ API keys

    def add_key(self, name: str, key: str) -> None:
        now = self._db.now()
        try:
            with self._db.write() as conn:
                conn.execute(sa.insert(t.api_keys).values(name=name, key_hash=key_hash(key), created_at=now))
        except IntegrityError as exc:
            raise UsageError(f"an API key named {name!r} exists already", field="name") from exc

    def list_keys(self) -> list[dict[str, Any]]:
        k = t.api_keys
        with self._db.read() as conn:
            rows = conn.execute(sa.select(k.c.name, k.c.created_at, k.c.revoked_at).order_by(k.c.name)).mappings()
            return [
                {"name": r["name"], "created_at": as_utc(r["created_at"]), "revoked_at": as_utc(r["revoked_at"])}
                for r in rows
            ]

    def revoke_key(self, name: str) -> None:
        k = t.api_keys
        with self._db.write() as conn:
            moved = conn.execute(
                sa.update(k).where(k.c.name == name, k.c.revoked_at.is_(None)).values(revoked_at=self._db.now())
            ).rowcount
        if not moved:
            raise UsageError(f"no active API key named {name!r} (see `dispatch apikeys list`)", field="name")

    def key_status(self, key: str) -> tuple[str, bool] | None:
        """(name, revoked) of the key, or None when no key has that hash."""
        k = t.api_keys
        with self._db.read() as conn:
            row = conn.execute(sa.select(k.c.name, k.c.revoked_at).where(k.c.key_hash == key_hash(key))).first()
        return None if row is None else (row.name, row.revoked_at is not None)
