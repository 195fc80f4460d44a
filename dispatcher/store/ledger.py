"""The tamper-evident ledger: every change of a delivery's state as an append-only, hash-chained event.

A run has one chain of its own and one chain per batch of its deliveries. The run's chain
(``events.batch`` NULL) starts with ``run.created`` (seq 0), which carries the run's campaign and
template snapshot hashes, a digest of every idempotency key with its initial state, and the number
of batch chains, so the head ties the ledger to exactly what was planned and a whole batch chain
deleted is missed by name. Every event about a delivery (its key, from- and to-state, provider id,
error code, reason, actor and time) goes to the chain of the delivery's batch (``events.batch`` =
``deliveries.batch_no``) and carries the hash of the event before it in that chain. A worker's claim
is one ``batch.claimed`` event on that chain naming every row it took (pending -> sending for each),
and its results are one ``batch.recorded`` event naming each row with its new state, provider id,
error code and reason (sending -> that state); ``audit verify`` and every reader of the ledger read
each as one state change per row named (``row_changes``). Changes made one row at a time (delivery
reports, operators, late results) are ``delivery.state`` events of their own. The chain's
identity (``<run id>/<batch>``) is inside the hashed material, so an event moved to another chain
does not verify. Each chain's tail (last seq and hash) is kept apart from its events: the run's in
``runs.ledger_seq``/``ledger_hash``, each batch chain's in its own ``ledger_tails`` row, so cutting
events off the end of any chain is caught too. When a run finishes (or is cancelled) a
``batches.sealed`` event on the run's chain records every batch tail (seqs and a digest of the
hashes), so a batch chain cut back and its tail row rewritten to match is caught as well.

Appends happen inside the same transaction as the state change they record (the store calls
``append``/``append_by_run`` from every method that changes ``deliveries.state``), so a state change
without its event cannot be committed. On PostgreSQL an append locks only the tail it extends
(``SELECT ... FOR UPDATE`` on that batch's ``ledger_tails`` row; the run row for the run's own
chain): workers recording different batches of one run never wait on each other, where one chain
per run made every worker on every host queue on the run row. SQLite's ``BEGIN IMMEDIATE``
serialises writers anyway. Tails are locked in batch order, so a transaction that spans batches
(a cancel, a requeue, delivery reports) cannot deadlock with another. Runs made before batch chains
(``runs.batch_chains`` NULL) keep every event in the run's chain, as they were written.

Nothing in the program updates or deletes an event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import StoreError
from ..keys import delivery_key
from ..redact import scrub_optional
from . import _leases as leases
from . import schema as t
from ._bulk import insert_rows
from .base import PENDING, SENDING

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


@dataclass(slots=True)  # per recipient: not frozen (see providers.base.OutgoingMessage)
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
    #: the delivery's batch when the caller has it at hand (the ledger reads it otherwise); it picks
    #: the chain and is sealed as the chain's identity, not as a field of its own
    batch: int | None = None


#: the event on a run's chain that records every batch chain's tail (when the run finishes or is cancelled)
SEAL_KIND = "batches.sealed"
#: the event on a batch's chain that moves the rows it names (``payload.ids``) from pending to sending
CLAIM_KIND = "batch.claimed"


#: the event on a batch's chain that records a worker's results for the rows it names (``payload.rows``):
#: ``sending -> state`` for each
RECORD_KIND = "batch.recorded"
#: events that stand for one state change per delivery they name
BATCH_KINDS = (CLAIM_KIND, RECORD_KIND)


def claim_event(ids: Sequence[int], batch: int, actor: str) -> Event:
    """A worker's claim of a batch's rows as one event: ``pending -> sending`` for each delivery id listed.

    ``audit verify`` reads it as that many state changes, at this event's place in the batch chain.
    """
    return Event(CLAIM_KIND, from_state="pending", to_state="sending", actor=actor, batch=batch,
                 payload={"ids": sorted(int(i) for i in ids)})  # fmt: skip


def record_event(rows: Iterable[tuple[int, str, str | None, str | None, str | None]], batch: int, actor: str) -> Event:
    """A worker's results for rows of one batch as one event: ``sending -> state`` for each row
    ``(delivery id, state, provider id, error code, reason)``, kept in delivery-id order.

    One hashed event per recorded batch instead of one per recipient: building, hashing and storing
    an event per row was about a quarter of the CPU a recipient cost the workers and the database
    together. Every reader (``audit verify``, ``audit log``, traces, alerts) expands it with
    ``row_changes`` into the per-delivery changes it stands for, at this event's place in the chain.
    Reasons are masked here, as ``_hashed_rows`` masks the ``reason`` column.
    """
    listed: list[list[Any]] = [
        [int(i), state, provider_id, error_code, scrub_optional(reason)]
        for i, state, provider_id, error_code, reason in sorted(rows, key=lambda row: row[0])
    ]
    return Event(RECORD_KIND, from_state="sending", actor=actor, batch=batch, payload={"rows": listed})


@dataclass(slots=True)
class RowChange:
    """One delivery's state change inside a batch event (a claim or a worker's results)."""

    delivery_id: int
    from_state: str | None
    to_state: str | None
    provider_id: str | None = None
    error_code: str | None = None
    reason: str | None = None


def row_changes(kind: str, from_state: str | None, to_state: str | None, payload: str | None) -> list[RowChange]:
    """The per-delivery state changes a stored event of ``BATCH_KINDS`` stands for (none for other kinds)."""
    if kind not in BATCH_KINDS:
        return []
    data = json.loads(payload or "{}")
    if kind == CLAIM_KIND:
        return [RowChange(int(i), from_state, to_state) for i in data.get("ids", ())]
    return [RowChange(int(r[0]), from_state, r[1], r[2], r[3], r[4]) for r in data.get("rows", ())]


@dataclass(frozen=True)
class Chain:
    """One hash chain: a run's own (``batch`` None; also the side chains) or one batch's of a run."""

    run_id: str
    batch: int | None = None

    @property
    def name(self) -> str:
        """What the chain is called in verify's messages and in every event's hashed material."""
        return self.run_id if self.batch is None else f"{self.run_id}/{self.batch}"


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


#: the canonical JSON of hashed material and of payloads. Built once: ``json.dumps`` with any non-default
#: option builds a new encoder per call, and the ledger encodes two texts per recipient
_encode_material = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
_encode_payload = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str).encode


def event_hash(prev_hash: str, run_id: str, seq: int, at: datetime, row: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything an auditor relies on, chained to ``prev_hash``."""
    return _event_hash(prev_hash, run_id, seq, _iso(at), row)


def _event_hash(prev_hash: str, run_id: str, seq: int, at_iso: str, row: dict[str, Any]) -> str:
    """``event_hash`` with the time already in its canonical form (one append shares one time)."""
    material = [
        prev_hash,
        run_id,
        seq,
        at_iso,
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
    return hashlib.sha256(_encode_material(material).encode("utf-8")).hexdigest()


def keys_digest(rows: Iterable[tuple[str, str]]) -> str:
    """Digest of (key, initial state) pairs in delivery-id order: what the run planned to do."""
    h = hashlib.sha256()
    for key, state in rows:
        h.update(f"{key}\t{state}\n".encode())
    return h.hexdigest()


def append(conn: Connection, run_id: str, events: Sequence[Event], at: datetime) -> None:
    """Append ``events`` to the run's chains inside the caller's transaction: events about a delivery
    to its batch's chain, the others to the run's own chain (or to the side chain ``run_id`` names)."""
    append_by_run(conn, ((run_id, event) for event in events), at)


def append_by_run(
    conn: Connection, events: Iterable[tuple[str, Event]], at: datetime, *, draft: Draft | None = None
) -> None:
    """Append ``(run_id, event)`` pairs, each to its chain, in the order given within each chain.

    ``draft``: the same events hashed before the caller's write began (``draft()``); a chain whose tail
    is still the one the draft was hashed against takes the draft's rows as they are.
    """
    pairs = list(events)
    if not pairs:
        return
    unknown = [e.delivery_id for rid, e in pairs if _routed(rid, e) and e.batch is None]
    batch_of = _batches_of(conn, unknown) if unknown else {}
    by_run: dict[str, list[tuple[int | None, Event]]] = {}
    for run_id, event in pairs:
        batch = None
        if _routed(run_id, event):
            batch = event.batch if event.batch is not None else batch_of.get(int(event.delivery_id or 0))
        by_run.setdefault(run_id, []).append((batch, event))
    # one order of locks for every writer (runs by id, a run's batches ascending, its own chain last)
    for run_id in sorted(by_run):
        _append_run(conn, run_id, by_run[run_id], at, draft)


def _routed(run_id: str, event: Event) -> bool:
    """Whether the event goes to a batch chain: it is about a delivery of a run, or about a batch of its
    deliveries (a claim, a worker's results), not a side chain's."""
    return (event.delivery_id is not None or event.kind in BATCH_KINDS) and not is_side_chain(run_id)


def _batches_of(conn: Connection, ids: Sequence[int | None]) -> dict[int, int]:
    d = t.deliveries
    wanted = sorted({int(i) for i in ids if i is not None})
    return {int(i): int(b) for i, b in conn.execute(sa.select(d.c.id, d.c.batch_no).where(d.c.id.in_(wanted)))}


def _append_run(
    conn: Connection, run_id: str, items: Sequence[tuple[int | None, Event]], at: datetime, draft: Draft | None
) -> None:
    groups: dict[int | None, list[Event]] = {}
    for batch, event in items:
        groups.setdefault(batch, []).append(event)
    batches = sorted(b for b in groups if b is not None)
    for i, batch in enumerate(batches):
        tail = _lock_tail(conn, run_id, batch)
        if tail is None:
            if i == 0 and _single_chain(conn, run_id):
                # a run made before batch chains: everything stays in its one chain, in the order given
                _append_chain(conn, Chain(run_id), [event for _, event in items], at)
                return
            raise StoreError(
                f"run {run_id}: the ledger has no tail for batch {batch}; `dispatch audit verify {run_id}`"
            )
        _append_chain(conn, Chain(run_id, batch), groups[batch], at, tail, draft)
    if None in groups:
        _append_chain(conn, Chain(run_id), groups[None], at)


def _lock_tail(conn: Connection, run_id: str, batch: int) -> tuple[int | None, str | None] | None:
    lt = t.ledger_tails
    query = sa.select(lt.c.ledger_seq, lt.c.ledger_hash).where(lt.c.run_id == run_id, lt.c.batch == batch)
    if conn.dialect.name != "sqlite":
        query = query.with_for_update()
    row = conn.execute(query).first()
    return None if row is None else (row.ledger_seq, row.ledger_hash)


def _single_chain(conn: Connection, run_id: str) -> bool:
    """A run made before batch chains (``runs.batch_chains`` NULL), or no run at all (one chain, as ever)."""
    chains = conn.execute(sa.select(t.runs.c.batch_chains).where(t.runs.c.id == run_id)).first()
    return chains is None or chains[0] is None


def _append_chain(
    conn: Connection,
    chain: Chain,
    events: Sequence[Event],
    at: datetime,
    tail: tuple[int | None, str | None] | None = None,
    draft: Draft | None = None,
) -> None:
    """Append to one chain; ``tail`` is the batch chain's tail already locked by the caller."""
    if not events:
        return
    run_id = chain.run_id
    if chain.batch is not None:
        table: sa.Table = t.ledger_tails
        where = [table.c.run_id == run_id, table.c.batch == chain.batch]
        assert tail is not None
        recorded = tail
    else:
        # a run keeps its own chain's tail on its row; chains that belong to no run in ledger_chains
        table = t.runs if not is_side_chain(run_id) else _chain_row(conn, run_id, at)
        where = [table.c.id == run_id]
        query = sa.select(table.c.ledger_seq, table.c.ledger_hash).where(*where)
        if conn.dialect.name != "sqlite":
            query = query.with_for_update()
        row = conn.execute(query).one()
        recorded = (row.ledger_seq, row.ledger_hash)
    drafted = draft.rows_for(chain, events, at, recorded) if draft is not None else None
    rows = drafted if drafted is not None else _hashed_rows(chain, events, at, recorded)
    insert_rows(conn, t.events, rows)
    conn.execute(sa.update(table).where(*where).values(ledger_seq=rows[-1]["seq"], ledger_hash=rows[-1]["hash"]))


def _hashed_rows(
    chain: Chain, events: Sequence[Event], at: datetime, tail: tuple[int | None, str | None]
) -> list[dict[str, Any]]:
    """The rows of ``events`` appended after ``tail`` (seq, hash) of ``chain``, each hashed and linked."""
    seq = -1 if tail[0] is None else int(tail[0])
    prev = tail[1] or GENESIS
    name = chain.name
    at_iso = _iso(at)
    rows = []
    for event in events:
        seq += 1
        data: dict[str, Any] = {
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
        digest = _event_hash(prev, name, seq, at_iso, data)
        data.update(run_id=chain.run_id, batch=chain.batch, seq=seq, at=at, prev_hash=prev, hash=digest)
        rows.append(data)
        prev = digest
    return rows


@dataclass
class Draft:
    """Batch-chain events hashed before the write that appends them, against each chain's tail as read then.

    Hashing is the largest share of an append, and on SQLite every writer waits while one writes: done
    beforehand, it leaves the write lock free. A chain's rows are taken only if, under the write's lock,
    its tail is still the one they were hashed against and the events appended are exactly those
    drafted (same objects, same order, same time); otherwise they are hashed again there, as without a
    draft. So a draft can only save work, never change what is written.
    """

    at: datetime
    chains: dict[Chain, tuple[tuple[int | None, str | None], list[Event], list[dict[str, Any]]]] = field(
        default_factory=dict
    )

    def rows_for(
        self, chain: Chain, events: Sequence[Event], at: datetime, tail: tuple[int | None, str | None]
    ) -> list[dict[str, Any]] | None:
        drafted = self.chains.get(chain)
        if drafted is None or at != self.at:
            return None
        expected, drafted_events, rows = drafted
        if expected != tail or len(drafted_events) != len(events):
            return None
        if any(a is not b for a, b in zip(drafted_events, events, strict=True)):
            return None
        return rows


def draft(conn: Connection, events: Iterable[tuple[str, Event]], at: datetime) -> Draft:
    """Hash ``(run_id, event)`` pairs ahead of ``append_by_run(..., draft=...)``, on any connection (a read).

    Only events of batch chains whose batch the event names are drafted (a result's, as workers record
    them); the rest are hashed when appended, as ever.
    """
    result = Draft(at)
    groups: dict[Chain, list[Event]] = {}
    for run_id, event in events:
        if event.batch is None or not _routed(run_id, event):
            continue
        groups.setdefault(Chain(run_id, event.batch), []).append(event)
    if not groups:
        return result
    lt = t.ledger_tails
    for run_id in sorted({c.run_id for c in groups}):
        batches = sorted(c.batch for c in groups if c.run_id == run_id and c.batch is not None)
        tails = {
            int(b): (s, h)
            for b, s, h in conn.execute(
                sa.select(lt.c.batch, lt.c.ledger_seq, lt.c.ledger_hash).where(
                    lt.c.run_id == run_id, lt.c.batch.in_(batches)
                )
            )
        }
        for batch in batches:
            if batch in tails:
                chain = Chain(run_id, batch)
                chain_events = groups[chain]
                result.chains[chain] = (tails[batch], chain_events, _hashed_rows(chain, chain_events, at, tails[batch]))
    return result


def _payload_text(payload: dict[str, Any]) -> str | None:
    return _encode_payload(payload) if payload else None


def _chain_row(conn: Connection, chain_id: str, at: datetime) -> sa.Table:
    """Make sure the non-run chain has its tail row (created once, concurrently safe) and return the table."""
    exists = conn.execute(sa.select(t.ledger_chains.c.id).where(t.ledger_chains.c.id == chain_id)).first()
    if exists is None:
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert = sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert
        stmt = dialect_insert(t.ledger_chains).values(id=chain_id, created_at=at)
        conn.execute(stmt.on_conflict_do_nothing())
    return t.ledger_chains


def open_run(conn: Connection, run_id: str, head: Event, at: datetime, *, chains: int | None = None) -> int:
    """Start a run's ledger, inside the transaction that wrote its delivery rows: one empty tail per batch
    (``ledger_tails``), their number on the run row, and the ``run.created`` head, which seals that number
    too. ``chains``: the number of batches, when the caller counted them as it wrote the rows (read from
    the rows otherwise). Returns the number of batch chains."""
    d, lt = t.deliveries, t.ledger_tails
    if chains is None:
        top = conn.execute(sa.select(sa.func.max(d.c.batch_no)).where(d.c.run_id == run_id)).scalar()
        chains = 0 if top is None else int(top) + 1
    if chains:
        conn.execute(sa.insert(lt), [{"run_id": run_id, "batch": b} for b in range(chains)])
    conn.execute(sa.update(t.runs).where(t.runs.c.id == run_id).values(batch_chains=chains))
    _append_chain(conn, Chain(run_id), [replace(head, payload={**head.payload, "batch_chains": chains})], at)
    return chains


def tails_digest(tails: Iterable[tuple[int, int, str | None]]) -> str:
    """Digest of (batch, seq, hash) tails in batch order: what a ``batches.sealed`` event holds."""
    h = hashlib.sha256()
    for batch, seq, digest in tails:
        h.update(f"{batch}\t{seq}\t{digest}\n".encode())
    return h.hexdigest()


def seal_batches(conn: Connection, run_id: str, at: datetime, actor: str = "system") -> bool:
    """Record every batch chain's tail on the run's own chain (a rare moment: the run finished or was
    cancelled). Reads the tails without locking them: each is a committed point of an append-only chain,
    which is all verify needs to find it again. False for a run without batch chains."""
    lt = t.ledger_tails
    tails = [
        (int(b), -1 if s is None else int(s), h or GENESIS)
        for b, s, h in conn.execute(
            sa.select(lt.c.batch, lt.c.ledger_seq, lt.c.ledger_hash).where(lt.c.run_id == run_id).order_by(lt.c.batch)
        )
    ]
    if not tails:
        return False
    payload = {"seqs": [s for _, s, _ in tails], "tails_sha256": tails_digest(tails)}
    _append_chain(conn, Chain(run_id), [Event(SEAL_KIND, actor=actor, payload=payload)], at)
    return True


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


def _walk(conn: Connection, chain: Chain, chunk: int, walked: _Walked) -> Iterator[Step]:
    """Recompute a chain event by event (constant memory: see ``_chain_events``).

    Yields ``(event, None)`` for each event that checks out, ``(None, break)`` at the first
    one that does not (and stops), and finally ``(None, None)``; ``walked`` then holds the
    end of the chain, for the caller to compare with the recorded tail.
    """
    prev = GENESIS
    name = chain.name
    for expected_seq, ev in enumerate(_chain_events(conn, chain, chunk)):
        if ev["seq"] != expected_seq:
            problem = (
                f"expected seq {expected_seq} here but found seq {ev['seq']}: "
                "an event was deleted here, or events were swapped or re-ordered"
            )
            yield None, Break(name, ev["seq"], ev["id"], problem)
            return
        if ev["prev_hash"] != prev:
            problem = "does not link to the event before it (prev_hash differs)"
            yield None, Break(name, ev["seq"], ev["id"], problem)
            return
        at = ev["at"] if ev["at"].tzinfo else ev["at"].replace(tzinfo=UTC)
        if event_hash(prev, name, ev["seq"], at, dict(ev)) != ev["hash"]:
            problem = "content does not match its hash (edited after it was written)"
            yield None, Break(name, ev["seq"], ev["id"], problem)
            return
        yield dict(ev), None
        prev = ev["hash"]
        walked.seq, walked.hash = expected_seq, prev
    yield None, None


def _chain_events(conn: Connection, chain: Chain, chunk: int) -> Iterator[Any]:
    """A chain's events in id order, one page in memory at a time.

    PostgreSQL streams one query through a server-side cursor: keyset pages there can
    make the planner sort the rest of the chain once per page when statistics are stale
    (just after a bulk load). SQLite reads keyset pages, each a short read.
    """
    e = t.events
    where = [e.c.run_id == chain.run_id, e.c.batch.is_(None) if chain.batch is None else e.c.batch == chain.batch]
    if conn.dialect.name != "sqlite":
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(
            sa.select(e).where(*where).order_by(e.c.id)
        )
        try:
            yield from result.mappings()
        finally:
            result.close()
        return
    last_id = 0
    while True:
        rows = conn.execute(sa.select(e).where(*where, e.c.id > last_id).order_by(e.c.id).limit(chunk)).mappings().all()
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


@dataclass(frozen=True)
class _Seal:
    seq: int
    event_id: int
    payload: dict[str, Any]


def verify_run(conn: Connection, run: Any, chunk: int = 5000) -> Break | None:
    """Recompute a run's chains from their heads; return the first break, or None if they are intact.

    Beyond each chain itself, the head must match the run's snapshot (and the snapshot its
    own text) and the approval it was made under (version, approver, or why it needed none),
    every batch chain the head seals must be there, each chain must end at its recorded tail
    and hold the tails sealed when the run finished, and the deliveries table must agree
    with the chains: every row's state is the ``to_state`` of its last event, its events are
    in its batch's chain, and the (key, initial state) digest equals the one sealed in the head.
    So an event edited, deleted, swapped or re-ordered, a chain cut short or deleted whole,
    and a delivery row changed behind the ledger's back, are all caught.
    """
    head_payload: dict[str, Any] | None = None
    seals: list[_Seal] = []
    walked = _Walked()
    for ev, brk in _walk(conn, Chain(run.id), chunk, walked):
        if brk is not None:
            return brk
        if ev is None:
            break
        if ev["kind"] == SEAL_KIND:
            seals.append(_Seal(ev["seq"], ev["id"], json.loads(ev["payload"] or "{}")))
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
            if head_payload.get("batch_chains") != run.batch_chains:
                return Break(
                    run.id, 0, ev["id"],
                    f"head seals {head_payload.get('batch_chains')} batch chains "
                    f"but the run row says {run.batch_chains}",
                )  # fmt: skip
    if head_payload is None:
        return Break(run.id, None, None, "the run has no ledger head (event seq 0 missing)")
    brk = _tail_break(run.id, walked, (run.ledger_seq, run.ledger_hash))
    if brk is not None:
        return brk
    if _sha(run.campaign_yaml) != run.campaign_sha256 or _sha(run.template_text) != run.template_sha256:
        return Break(run.id, None, None, "the run's stored campaign/template text does not match its sha256")
    return (
        _verify_batch_chains(conn, run, head_payload.get("batch_chains"), seals, chunk)
        or _check_deliveries(conn, run, head_payload, chunk)
        or _check_confirmed(conn, run)
    )


def _verify_batch_chains(
    conn: Connection, run: Any, sealed: int | None, seals: Sequence[_Seal], chunk: int
) -> Break | None:
    """Walk every batch chain the head seals, against its tail row and the tails sealed on finishing.

    Memory grows with the number of batches (a seq and a hash each), never with the events.
    """
    e, lt = t.events, t.ledger_tails
    chains = int(sealed or 0)
    stray = conn.execute(
        sa.select(e.c.id, e.c.batch, e.c.seq)
        .where(e.c.run_id == run.id, e.c.batch.is_not(None), sa.or_(e.c.batch < 0, e.c.batch >= chains))
        .limit(1)
    ).first()
    if stray is not None:
        return Break(
            Chain(run.id, stray.batch).name, stray.seq, stray.id, f"the head seals {chains} batch chains, not this one"
        )
    tails = {
        int(b): (s, h)
        for b, s, h in conn.execute(
            sa.select(lt.c.batch, lt.c.ledger_seq, lt.c.ledger_hash).where(lt.c.run_id == run.id)
        )
    }
    extra = sorted(b for b in tails if not 0 <= b < chains)
    if extra:
        return Break(Chain(run.id, extra[0]).name, None, None, "a tail for a batch chain the head does not seal")
    # the hashes the seals expect to find, by batch and seq (filled in while walking)
    wanted: dict[int, dict[int, str | None]] = {}
    for seal in seals:
        seqs = seal.payload.get("seqs")
        if not isinstance(seqs, list) or len(seqs) != chains:
            return Break(run.id, seal.seq, seal.event_id, f"the seal does not hold {chains} batch tails")
        for batch, seq in enumerate(seqs):
            wanted.setdefault(batch, {})[int(seq)] = None
    for batch in range(chains):
        chain = Chain(run.id, batch)
        if batch not in tails:
            return Break(chain.name, None, None, "the batch chain sealed in the head has no tail: it was deleted")
        walked = _Walked()
        found = wanted.get(batch, {})
        for ev, brk in _walk(conn, chain, chunk, walked):
            if brk is not None:
                return brk
            if ev is not None and ev["seq"] in found:
                found[ev["seq"]] = ev["hash"]
        brk = _tail_break(chain.name, walked, tails[batch])
        if brk is not None:
            return brk
    for seal in seals:
        rebuilt = []
        for batch, seq in enumerate(seal.payload["seqs"]):
            digest = GENESIS if seq < 0 else wanted[batch][seq]
            if digest is None:
                return Break(
                    Chain(run.id, batch).name, seq, None,
                    f"the chain ends before seq {seq}, sealed by event {seal.event_id} (seq {seal.seq}) "
                    f"of chain {run.id}: events were cut off and the tail rewritten",
                )  # fmt: skip
            rebuilt.append((batch, seq, digest))
        if tails_digest(rebuilt) != seal.payload.get("tails_sha256"):
            return Break(
                run.id, seal.seq, seal.event_id,
                "the batch tails sealed here are not in the chains: a batch chain was rewritten",
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
        sa.select(e.c.id, e.c.seq, e.c.delivery_id, e.c.batch)
        .select_from(e.join(d, d.c.key == e.c.key))
        .where(e.c.run_id == run.id, e.c.kind == "delivery.confirmed", d.c.confirmed_at.is_(None))
        .limit(1)
    ).first()
    if cleared is not None:
        return Break(
            Chain(run.id, cleared.batch).name,
            cleared.seq,
            cleared.id,
            f"delivery {cleared.delivery_id} was confirmed but is no longer",
        )
    return None


def verify_chain(conn: Connection, chain_id: str, chunk: int = 5000) -> Break | None:
    """Recompute a chain that belongs to no run (the audit chain); None if intact or never written."""
    tail = conn.execute(
        sa.select(t.ledger_chains.c.ledger_seq, t.ledger_chains.c.ledger_hash).where(t.ledger_chains.c.id == chain_id)
    ).first()
    walked = _Walked()
    for _ev, brk in _walk(conn, Chain(chain_id), chunk, walked):
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
    """Cross-check the deliveries and attempts tables against the (already verified) chains, one page
    of rows at a time: each row's state against its last event, each attempt against the event written
    with it, and the (key, initial state) digest against the head."""
    d, e = t.deliveries, t.events
    digest = hashlib.sha256()
    last_id = 0
    total = 0
    # a live lease's rows stay pending in the table while the chain says a claim took them (store/_leases.py)
    leased = {i for lease in leases.of_run(conn, run.id) for i in lease.ids}
    while True:
        rows = conn.execute(
            sa.select(d.c.id, d.c.key, d.c.state, d.c.phone, d.c.batch_no)
            .where(d.c.run_id == run.id, d.c.id > last_id)
            .order_by(d.c.id)
            .limit(chunk)
        ).all()
        if not rows:
            break
        first_from: dict[str, str | None] = {}
        last_to: dict[str, tuple[str | None, int, int]] = {}
        batch_of = {r.key: r.batch_no for r in rows}
        id_of = {r.key: r.id for r in rows}
        # select by key only (ix_events_key) and order here: with run_id or ORDER BY seq in the query
        # SQLite picks the (run_id, seq) index and scans the whole chain once per page
        found = [
            _Change(*ev)
            for ev in conn.execute(
                sa.select(
                    e.c.key, e.c.from_state, e.c.to_state, e.c.seq, e.c.id, e.c.run_id, e.c.kind, e.c.batch, e.c.at
                ).where(e.c.key.in_([r.key for r in rows]))
            )
        ]
        found.extend(_batched_in(conn, run, rows))
        # a delivery's events are all in one chain (its batch's; the run's own for a run made before
        # batch chains), so their seqs order them
        found = sorted((ev for ev in found if ev.chain == run.id), key=lambda ev: ev.seq)
        for ev in found:
            expected = None if run.batch_chains is None else batch_of[ev.key]
            if ev.batch != expected:
                return Break(
                    Chain(run.id, ev.batch).name, ev.seq, ev.event_id,
                    f"an event of delivery {ev.key!r} outside its batch's chain ({Chain(run.id, expected).name})",
                )  # fmt: skip
            if ev.kind != "delivery.state":
                continue
            first_from.setdefault(ev.key, ev.from_state)
            last_to[ev.key] = (ev.to_state, ev.seq, ev.event_id)
        for row in rows:
            if row.key != delivery_key(run.id, row.phone):
                # the key (run + number) is sealed in the head's digest; the number column must agree with it
                return Break(run.id, None, None, f"delivery {row.id}: phone column differs from its key")
            if (
                row.key in last_to
                and last_to[row.key][0] != row.state
                and not (row.id in leased and (row.state, last_to[row.key][0]) == (PENDING, SENDING))
            ):
                to_state, seq, event_id = last_to[row.key]
                return Break(
                    Chain(run.id, None if run.batch_chains is None else row.batch_no).name, seq, event_id,
                    f"delivery {row.id} is {row.state!r} in the deliveries table "
                    f"but its last event says {to_state!r}",
                )  # fmt: skip
            digest.update(f"{row.key}\t{first_from.get(row.key, row.state)}\n".encode())
        brk = _check_attempts(conn, run, found, id_of, batch_of)
        if brk is not None:
            return brk
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


@dataclass(slots=True)
class _Change:
    """An event about one delivery as verify reads it: a row of its own, or one row of a batch event."""

    key: str
    from_state: str | None
    to_state: str | None
    seq: int
    event_id: int
    chain: str
    kind: str
    batch: int | None
    at: datetime


def _instant(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _handover(ev: _Change) -> bool:
    """Whether the event records a gateway's answer to a hand-over (it must have its attempt row)."""
    return ev.kind == "delivery.late" or (
        ev.kind == "delivery.state" and ev.from_state == "sending" and ev.to_state in ("sent", "unknown")
    )


def _check_attempts(
    conn: Connection, run: Any, found: Sequence[_Change], id_of: dict[str, int], batch_of: dict[str, int]
) -> Break | None:
    """Cross-check a page's attempts against its events: every attempt was written with a ledger event
    of its delivery (same instant), and every hand-over event has its attempt. An attempt without an
    event is a hand-over the ledger does not show; an event without one, a forged send."""
    a = t.attempts
    attempts = conn.execute(
        sa.select(a.c.delivery_id, a.c.attempt, a.c.at).where(
            a.c.run_id == run.id, a.c.delivery_id.in_(list(id_of.values()))
        )
    ).all()
    evented = {(id_of[ev.key], _instant(ev.at)) for ev in found}
    attempted = set()
    for delivery_id, attempt, at in sorted(attempts):
        attempted.add((delivery_id, _instant(at)))
        if (delivery_id, _instant(at)) not in evented:
            return Break(
                run.id, None, None,
                f"attempt {attempt} of delivery {delivery_id} has no ledger event: "
                "a hand-over to the gateway is missing from the ledger",
            )  # fmt: skip
    for ev in found:
        if _handover(ev) and (id_of[ev.key], _instant(ev.at)) not in attempted:
            return Break(
                Chain(run.id, ev.batch).name, ev.seq, ev.event_id,
                f"hand-over event of delivery {id_of[ev.key]} has no attempt row",
            )  # fmt: skip
    return None


def _batched_in(conn: Connection, run: Any, rows: Sequence[Any]) -> list[_Change]:
    """The changes batch events (claims, results) make to a page of delivery rows: one ``delivery.state``
    per row an event names, at the event's place in its chain."""
    e = t.events
    by_id = {r.id: r.key for r in rows}
    # a run made before batch chains keeps every event in its own chain
    batches = sorted({r.batch_no for r in rows})
    where = e.c.batch.is_(None) if run.batch_chains is None else e.c.batch.in_(batches)
    found = []
    for seq, event_id, batch, kind, from_state, to_state, at, payload in conn.execute(
        sa.select(e.c.seq, e.c.id, e.c.batch, e.c.kind, e.c.from_state, e.c.to_state, e.c.at, e.c.payload).where(
            e.c.run_id == run.id, e.c.kind.in_(BATCH_KINDS), where
        )
    ):
        for change in row_changes(kind, from_state, to_state, payload):
            key = by_id.get(change.delivery_id)
            if key is not None:
                found.append(
                    _Change(key, change.from_state, change.to_state, seq, event_id, run.id, "delivery.state", batch, at)
                )
    return found
