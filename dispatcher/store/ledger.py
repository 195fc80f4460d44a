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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..keys import delivery_key
from ..redact import scrub_optional
from . import schema as t

GENESIS = "0" * 64
#: the chain of audit events that belong to no run (``audit.export``: who exported unmasked numbers).
#: Run ids look like ``20210315-080000-a1b2c3``, so this id can never collide with one.
AUDIT_CHAIN = "audit"
#: an early-warning alert's chain is ``alert:<alert id>`` (no run id holds a colon)
ALERT_CHAIN_PREFIX = "alert:"


def alert_chain(alert_id: str) -> str:
    return f"{ALERT_CHAIN_PREFIX}{alert_id}"


def is_side_chain(chain_id: str) -> bool:
    """A chain that belongs to no run: its tail lives in ``ledger_chains``."""
    return chain_id == AUDIT_CHAIN or chain_id.startswith(ALERT_CHAIN_PREFIX)


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
    # a run keeps its tail on its own row; chains that belong to no run (the audit chain) in ledger_chains
    runs = t.runs if not is_side_chain(run_id) else _chain_row(conn, run_id, at)
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
            # the one place every event is written: free text is masked before it is hashed and kept
            "reason": scrub_optional(event.reason),
            "actor": event.actor,
            "payload": _payload_text(event.payload),
        }
        digest = event_hash(prev, run_id, seq, at, data)
        rows.append({**data, "run_id": run_id, "seq": seq, "at": at, "prev_hash": prev, "hash": digest})
        prev = digest
    conn.execute(sa.insert(t.events), rows)  # executemany: psycopg pipelines it
    conn.execute(sa.update(runs).where(runs.c.id == run_id).values(ledger_seq=seq, ledger_hash=prev))


def _payload_text(payload: dict[str, Any]) -> str | None:
    return json.dumps(payload, ensure_ascii=False, sort_keys=True, default=str) if payload else None


def _chain_row(conn: Connection, chain_id: str, at: datetime) -> sa.Table:
    """Make sure the non-run chain has its tail row (created once, concurrently safe) and return the table."""
    exists = conn.execute(sa.select(t.ledger_chains.c.id).where(t.ledger_chains.c.id == chain_id)).first()
    if exists is None:
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert = sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert
        stmt = dialect_insert(t.ledger_chains).values(id=chain_id, created_at=at)
        conn.execute(stmt.on_conflict_do_nothing())
    return t.ledger_chains


def append_by_run(conn: Connection, events: Iterable[tuple[str, Event]], at: datetime) -> None:
    """Append ``(run_id, event)`` pairs, each run's events to its own chain, in the order given."""
    by_run: dict[str, list[Event]] = {}
    for run_id, event in events:
        by_run.setdefault(run_id, []).append(event)
    for run_id, run_events in by_run.items():
        append(conn, run_id, run_events, at)


@dataclass(frozen=True)
class Break:
    """The first place a run's chain does not add up."""

    run_id: str
    seq: int | None
    event_id: int | None
    problem: str

    def __str__(self) -> str:
        if self.event_id is not None:
            where = f"event {self.event_id} (chain {self.run_id}, seq {self.seq})"
        else:
            where = f"chain {self.run_id}" + (f" at seq {self.seq}" if self.seq is not None else "")
        return f"{where}: {self.problem}"


Step = tuple[dict[str, Any] | None, Break | None]


@dataclass
class _Walked:
    """Where a walk ended: the last good sequence number and hash (what the tail must equal)."""

    seq: int = -1
    hash: str = GENESIS


def _walk(conn: Connection, chain_id: str, chunk: int, walked: _Walked) -> Iterator[Step]:
    """Recompute a chain event by event (constant memory: see ``_chain_events``).

    Yields ``(event, None)`` for each event that checks out, ``(None, break)`` at the first
    one that does not (and stops), and finally ``(None, None)``; ``walked`` then holds the
    end of the chain, for the caller to compare with the recorded tail.
    """
    prev = GENESIS
    for expected_seq, ev in enumerate(_chain_events(conn, chain_id, chunk)):
        if ev["seq"] != expected_seq:
            problem = (
                f"expected seq {expected_seq} here but found seq {ev['seq']}: "
                "an event was deleted here, or events were swapped or re-ordered"
            )
            yield None, Break(chain_id, ev["seq"], ev["id"], problem)
            return
        if ev["prev_hash"] != prev:
            problem = "does not link to the event before it (prev_hash differs)"
            yield None, Break(chain_id, ev["seq"], ev["id"], problem)
            return
        at = ev["at"] if ev["at"].tzinfo else ev["at"].replace(tzinfo=UTC)
        if event_hash(prev, chain_id, ev["seq"], at, dict(ev)) != ev["hash"]:
            problem = "content does not match its hash (edited after it was written)"
            yield None, Break(chain_id, ev["seq"], ev["id"], problem)
            return
        yield dict(ev), None
        prev = ev["hash"]
        walked.seq, walked.hash = expected_seq, prev
    yield None, None


def _chain_events(conn: Connection, chain_id: str, chunk: int) -> Iterator[Any]:
    """A chain's events in id order, one page in memory at a time.

    PostgreSQL streams one query through a server-side cursor: keyset pages there can
    make the planner sort the rest of the chain once per page when statistics are stale
    (just after a bulk load). SQLite reads keyset pages, each a short read.
    """
    e = t.events
    if conn.dialect.name != "sqlite":
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(
            sa.select(e).where(e.c.run_id == chain_id).order_by(e.c.id)
        )
        try:
            yield from result.mappings()
        finally:
            result.close()
        return
    last_id = 0
    while True:
        rows = (
            conn.execute(sa.select(e).where(e.c.run_id == chain_id, e.c.id > last_id).order_by(e.c.id).limit(chunk))
            .mappings()
            .all()
        )
        if not rows:
            return
        yield from rows
        last_id = rows[-1]["id"]


def _tail_break(chain_id: str, walked: _Walked, recorded: tuple[int | None, str | None]) -> Break | None:
    walked_seq, walked_hash = walked.seq, walked.hash
    rec_seq = -1 if recorded[0] is None else int(recorded[0])
    rec_hash = recorded[1] or GENESIS
    if (walked_seq, walked_hash) == (rec_seq, rec_hash):
        return None
    if walked_seq < rec_seq:
        problem = f"events seq {walked_seq + 1}..{rec_seq} missing: the chain ends before its recorded tail"
        return Break(chain_id, walked_seq + 1, None, problem)
    problem = f"the chain's last event (seq {walked_seq}) is not the recorded tail (seq {rec_seq})"
    return Break(chain_id, walked_seq, None, problem)


def verify_run(conn: Connection, run: Any, chunk: int = 5000) -> Break | None:
    """Recompute one run's chain from its head; return the first break, or None if it is intact.

    Beyond the chain itself, the head must match the run's snapshot (and the snapshot its
    own text) and the approval it was made under (version, approver, or why it needed none),
    the chain must end at the recorded tail, and the deliveries table must agree
    with the chain: every row's state is the ``to_state`` of its last event, and the
    (key, initial state) digest equals the one sealed in the head. So an event edited,
    deleted, swapped or re-ordered, and a delivery row changed behind the ledger's back,
    are all caught.
    """
    head_payload: dict[str, Any] | None = None
    walked = _Walked()
    for ev, brk in _walk(conn, run.id, chunk, walked):
        if brk is not None:
            return brk
        if ev is None:
            break
        if ev["seq"] == 0:
            head_payload = json.loads(ev["payload"] or "{}")
            if ev["kind"] != "run.created":
                return Break(run.id, 0, ev["id"], f"the head is a {ev['kind']!r} event, not run.created")
            if (head_payload.get("campaign_sha256"), head_payload.get("template_sha256")) != (
                run.campaign_sha256,
                run.template_sha256,
            ):
                return Break(run.id, 0, ev["id"], "head does not match the run's campaign/template snapshot")
            approval = tuple(head_payload.get(k) for k in ("version_sha256", "approved_by", "approval_exempt"))
            if approval != (run.version_sha256, run.approved_by, run.approval_exempt):
                return Break(
                    run.id, 0, ev["id"], "head does not match the run's approval (version, approver, exemption)"
                )
    if head_payload is None:
        return Break(run.id, None, None, "the run has no ledger head (event seq 0 missing)")
    brk = _tail_break(run.id, walked, (run.ledger_seq, run.ledger_hash))
    if brk is not None:
        return brk
    if _sha(run.campaign_yaml) != run.campaign_sha256 or _sha(run.template_text) != run.template_sha256:
        return Break(run.id, None, None, "the run's stored campaign/template text does not match its sha256")
    return (
        _check_deliveries(conn, run, head_payload, chunk)
        or _check_attempts(conn, run)
        or _check_confirmed(conn, run)
    )


#: events that record a gateway's answer to a hand-over: each must have its attempt row, and back
_HANDOVER = sa.or_(
    sa.and_(
        t.events.c.kind == "delivery.state",
        t.events.c.from_state == "sending",
        t.events.c.to_state.in_(("sent", "unknown")),
    ),
    t.events.c.kind == "delivery.late",
)


def _check_attempts(conn: Connection, run: Any) -> Break | None:
    """Cross-check the attempts table against the chain: every attempt was written with its ledger
    event (same delivery, same instant), and every hand-over event has its attempt. An attempt
    without an event is a hand-over the ledger does not show; an event without one, a forged send."""
    a, d, e = t.attempts, t.deliveries, t.events
    orphan_attempt = conn.execute(
        sa.select(a.c.id, a.c.delivery_id, a.c.attempt)
        .select_from(a.join(d, d.c.id == a.c.delivery_id))
        .where(
            a.c.run_id == run.id,
            ~sa.exists().where(e.c.key == d.c.key, e.c.at == a.c.at, e.c.run_id == a.c.run_id),
        )
        .limit(1)
    ).first()
    if orphan_attempt is not None:
        return Break(
            run.id, None, None,
            f"attempt {orphan_attempt.attempt} of delivery {orphan_attempt.delivery_id} has no ledger event: "
            "a hand-over to the gateway is missing from the ledger",
        )  # fmt: skip
    unbacked = conn.execute(
        sa.select(e.c.id, e.c.seq, e.c.delivery_id)
        .where(
            e.c.run_id == run.id,
            _HANDOVER,
            ~sa.exists().where(a.c.delivery_id == e.c.delivery_id, a.c.at == e.c.at),
        )
        .limit(1)
    ).first()
    if unbacked is not None:
        return Break(
            run.id, unbacked.seq, unbacked.id,
            f"hand-over event of delivery {unbacked.delivery_id} has no attempt row",
        )  # fmt: skip
    return None


def _check_confirmed(conn: Connection, run: Any) -> Break | None:
    """A voice call's confirmation (``deliveries.confirmed_at``) and its ``delivery.confirmed`` event go
    together: a row confirmed without the event was changed behind the ledger's back, an event whose row
    is not confirmed means the row was cleared after the fact."""
    d, e = t.deliveries, t.events
    confirmed_event = sa.exists().where(
        e.c.run_id == run.id, e.c.key == d.c.key, e.c.kind == "delivery.confirmed", e.c.at == d.c.confirmed_at
    )
    unbacked = conn.execute(
        sa.select(d.c.id).where(d.c.run_id == run.id, d.c.confirmed_at.is_not(None), ~confirmed_event).limit(1)
    ).first()
    if unbacked is not None:
        return Break(run.id, None, None, f"delivery {unbacked.id} is confirmed but has no delivery.confirmed event")
    cleared = conn.execute(
        sa.select(e.c.id, e.c.seq, e.c.delivery_id)
        .select_from(e.join(d, d.c.key == e.c.key))
        .where(e.c.run_id == run.id, e.c.kind == "delivery.confirmed", d.c.confirmed_at.is_(None))
        .limit(1)
    ).first()
    if cleared is not None:
        return Break(
            run.id, cleared.seq, cleared.id, f"delivery {cleared.delivery_id} was confirmed but is no longer"
        )
    return None


def verify_chain(conn: Connection, chain_id: str, chunk: int = 5000) -> Break | None:
    """Recompute a chain that belongs to no run (the audit chain); None if intact or never written."""
    tail = conn.execute(
        sa.select(t.ledger_chains.c.ledger_seq, t.ledger_chains.c.ledger_hash).where(t.ledger_chains.c.id == chain_id)
    ).first()
    walked = _Walked()
    for _ev, brk in _walk(conn, chain_id, chunk, walked):
        if brk is not None:
            return brk
    if tail is None:
        if walked.seq >= 0:
            return Break(chain_id, None, None, "events exist but the chain's recorded tail is gone")
        return None
    return _tail_break(chain_id, walked, (tail.ledger_seq, tail.ledger_hash))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_deliveries(conn: Connection, run: Any, head: dict[str, Any], chunk: int) -> Break | None:
    """Cross-check the deliveries table against the (already verified) chain, one page of rows at a time."""
    d, e = t.deliveries, t.events
    digest = hashlib.sha256()
    last_id = 0
    total = 0
    while True:
        rows = conn.execute(
            sa.select(d.c.id, d.c.key, d.c.state, d.c.phone)
            .where(d.c.run_id == run.id, d.c.id > last_id)
            .order_by(d.c.id)
            .limit(chunk)
        ).all()
        if not rows:
            break
        first_from: dict[str, str] = {}
        last_to: dict[str, tuple[str, int, int]] = {}
        # select by key only (ix_events_key) and order here: with run_id or ORDER BY seq in the query
        # SQLite picks the (run_id, seq) index and scans the whole chain once per page
        found = conn.execute(
            sa.select(e.c.key, e.c.from_state, e.c.to_state, e.c.seq, e.c.id, e.c.run_id, e.c.kind).where(
                e.c.key.in_([r.key for r in rows])
            )
        ).all()
        for key, from_state, to_state, seq, event_id, chain, kind in sorted(found, key=lambda ev: ev.seq):
            if chain != run.id or kind != "delivery.state":
                continue
            first_from.setdefault(key, from_state)
            last_to[key] = (to_state, seq, event_id)
        for row in rows:
            if row.key != delivery_key(run.id, row.phone):
                # the key (run + number) is sealed in the head's digest; the number column must agree with it
                return Break(run.id, None, None, f"delivery {row.id}: phone column differs from its key")
            if row.key in last_to and last_to[row.key][0] != row.state:
                to_state, seq, event_id = last_to[row.key]
                return Break(
                    run.id, seq, event_id,
                    f"delivery {row.id} is {row.state!r} in the deliveries table "
                    f"but its last event says {to_state!r}",
                )  # fmt: skip
            digest.update(f"{row.key}\t{first_from.get(row.key, row.state)}\n".encode())
        total += len(rows)
        last_id = rows[-1].id
    if digest.hexdigest() != head.get("keys_sha256") or total != head.get("total"):
        return Break(
            run.id, 0, None,
            f"the deliveries table ({total} rows) does not match the keys and initial states "
            f"sealed in the head "
            f"({head.get('total')} rows): a delivery row was added, deleted or changed outside the ledger",
        )  # fmt: skip
    return None
