"""The tamper-evident ledger: every change of a delivery's state as an append-only, hash-chained event.

One chain per run. Event 0 (``run.created``) carries the run's campaign and template
snapshot hashes and a digest of every idempotency key with its initial state, so
the head ties the chain to exactly what was planned. Every later event names a
delivery (``key``), its from- and to-state, provider id, error code, reason, actor
and time, and carries the hash of the event before it. ``runs.ledger_seq`` and
``runs.ledger_hash`` hold the tail, so cutting events off the end is caught too.

Appends happen inside the same transaction as the state change they record (the
store calls ``append`` from every method that changes ``deliveries.state``), so a
state change without its event cannot be committed. On PostgreSQL the run row is
locked (``SELECT ... FOR UPDATE``) to serialise appends to one chain; SQLite's
``BEGIN IMMEDIATE`` already serialises writers.

Nothing in the program updates or deletes an event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as t

GENESIS = "0" * 64


@dataclass(frozen=True)
class Event:
    kind: str  # "run.created", "delivery.state", "audit.export", ...
    key: str | None = None
    delivery_id: int | None = None
    from_state: str | None = None
    to_state: str | None = None
    provider_id: str | None = None
    error_code: str | None = None
    reason: str | None = None
    actor: str = "system"
    payload: dict[str, Any] = field(default_factory=dict)


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(prev_hash: str, run_id: str, seq: int, at: datetime, row: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything an auditor relies on, chained to ``prev_hash``."""
    material = [
        prev_hash,
        run_id,
        seq,
        _iso(at),
        row.get("kind"),
        row.get("key"),
        row.get("delivery_id"),
        row.get("from_state"),
        row.get("to_state"),
        row.get("provider_id"),
        row.get("error_code"),
        row.get("reason"),
        row.get("actor"),
        row.get("payload") or "",
    ]
    blob = json.dumps(material, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def keys_digest(rows: Iterable[tuple[str, str]]) -> str:
    """Digest of (key, initial state) pairs in delivery-id order: what the run planned to do."""
    h = hashlib.sha256()
    for key, state in rows:
        h.update(f"{key}\t{state}\n".encode())
    return h.hexdigest()


def append(conn: Connection, run_id: str, events: Sequence[Event], at: datetime) -> None:
    """Append ``events`` to the run's chain inside the caller's transaction."""
    if not events:
        return
    runs = t.runs
    query = sa.select(runs.c.ledger_seq, runs.c.ledger_hash).where(runs.c.id == run_id)
    if conn.dialect.name != "sqlite":
        query = query.with_for_update()
    row = conn.execute(query).one()
    seq = -1 if row.ledger_seq is None else int(row.ledger_seq)
    prev = row.ledger_hash or GENESIS
    rows = []
    for event in events:
        seq += 1
        data = {
            "kind": event.kind,
            "key": event.key,
            "delivery_id": event.delivery_id,
            "from_state": event.from_state,
            "to_state": event.to_state,
            "provider_id": event.provider_id,
            "error_code": event.error_code,
            "reason": event.reason,
            "actor": event.actor,
            "payload": json.dumps(event.payload, ensure_ascii=False, sort_keys=True, default=str) if event.payload else None,
        }
        digest = event_hash(prev, run_id, seq, at, data)
        rows.append({**data, "run_id": run_id, "seq": seq, "at": at, "prev_hash": prev, "hash": digest})
        prev = digest
    conn.execute(sa.insert(t.events), rows)
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(ledger_seq=seq, ledger_hash=prev))


@dataclass(frozen=True)
class Break:
    """The first place a run's chain does not add up."""

    run_id: str
    seq: int | None
    event_id: int | None
    problem: str

    def __str__(self) -> str:
        where = f"event {self.event_id} (run {self.run_id}, seq {self.seq})" if self.event_id is not None else f"run {self.run_id}"
        return f"{where}: {self.problem}"


def verify_run(conn: Connection, run: Any, chunk: int = 5000) -> Break | None:
    """Recompute one run's chain from its head; return the first break, or None if it is intact."""
    e = t.events
    prev = GENESIS
    expected_seq = 0
    last_id = 0
    head_payload: dict[str, Any] | None = None
    while True:
        rows = conn.execute(
            sa.select(e).where(e.c.run_id == run.id, e.c.id > last_id).order_by(e.c.id).limit(chunk)
        ).mappings().all()
        if not rows:
            break
        for ev in rows:
            if ev["seq"] != expected_seq:
                return Break(run.id, ev["seq"], ev["id"], f"sequence jumps from {expected_seq - 1} to {ev['seq']} (an event is missing or moved)")
            if ev["prev_hash"] != prev:
                return Break(run.id, ev["seq"], ev["id"], "does not link to the event before it")
            at = ev["at"] if ev["at"].tzinfo else ev["at"].replace(tzinfo=UTC)
            if event_hash(prev, run.id, ev["seq"], at, dict(ev)) != ev["hash"]:
                return Break(run.id, ev["seq"], ev["id"], "content does not match its hash (edited)")
            if ev["seq"] == 0:
                head_payload = json.loads(ev["payload"] or "{}")
                if head_payload.get("campaign_sha256") != run.campaign_sha256 or head_payload.get("template_sha256") != run.template_sha256:
                    return Break(run.id, 0, ev["id"], "head does not match the run's campaign/template snapshot")
            prev = ev["hash"]
            expected_seq += 1
            last_id = ev["id"]
    if head_payload is None:
        return Break(run.id, None, None, "the run has no ledger head")
    if (run.ledger_seq, run.ledger_hash) != (expected_seq - 1, prev):
        return Break(run.id, expected_seq - 1, None, "the chain ends before the run's recorded tail (events removed)")
    return None
