"""What auditors read from the ledger: chain verification, the event log by filter, the audit chain.

``dispatcher.audit`` parses filters, masks numbers and writes the output; the queries live here.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Protocol

import sqlalchemy as sa

from ..keys import SEPARATOR
from . import ledger
from . import schema as t
from ._db import Db
from ._rows import rows_of_phone


class EventQuery(Protocol):
    """The filter the log is narrowed by (``dispatcher.audit.LogFilter`` has this shape)."""

    @property
    def campaign(self) -> str | None: ...
    @property
    def run(self) -> str | None: ...
    @property
    def district(self) -> str | None: ...
    @property
    def segment(self) -> str | None: ...
    @property
    def state(self) -> str | None: ...
    @property
    def error_code(self) -> str | None: ...
    @property
    def phone(self) -> str | None: ...
    @property
    def since(self) -> datetime | None: ...
    @property
    def until(self) -> datetime | None: ...


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _event_where(f: EventQuery) -> list[Any]:
    """What narrows the events themselves (their run, campaign and time)."""
    e, r = t.events, t.runs
    where: list[Any] = []
    if f.run:
        where.append(e.c.run_id == f.run)
    if f.campaign:
        where.append(r.c.campaign_id == f.campaign)
    if f.since:
        where.append(e.c.at >= f.since)
    if f.until:
        where.append(e.c.at <= f.until)
    return where


def _delivery_where(f: EventQuery) -> list[Any]:
    """What narrows the deliveries the events are about (their district, group and number)."""
    d = t.deliveries
    where: list[Any] = []
    if f.district:
        where.append(d.c.district == f.district)
    if f.segment:
        rs = t.resident_segments
        where.append(sa.exists().where(rs.c.resident_id == d.c.resident_id, rs.c.segment == f.segment))
    if f.phone:
        where.append(d.c.phone == f.phone)
    return where


def _phone_keys(phone: str) -> Any:
    """The number's idempotency keys, one per run. deliveries.phone has no index (it slowed fan-out); a
    delivery's key is its run's id and its number (keys.delivery_key). Events' keys are indexed; a
    delivery row is found by its key through ``rows_of_phone``."""
    return sa.select(t.runs.c.id + sa.literal(SEPARATOR + phone))


def _where(f: EventQuery) -> list[Any]:
    """The filter on events of one delivery each (``delivery.state``)."""
    e = t.events
    where: list[Any] = [e.c.kind == "delivery.state", *_event_where(f), *_delivery_where(f)]
    if f.state:
        where.append(e.c.to_state == f.state)
    if f.error_code:
        where.append(e.c.error_code == f.error_code)
    if f.phone:
        where.append(e.c.key.in_(_phone_keys(f.phone)))
    return where


def _batch_where(f: EventQuery, *, by_key: bool) -> list[Any]:
    """The filter on a worker's batch results (``batch.recorded``) that SQL can apply before expanding them."""
    e, d = t.events, t.deliveries
    where: list[Any] = [e.c.kind == ledger.RECORD_KIND, *_event_where(f)]
    if f.phone:
        # only the chains of the batches that hold the number (its delivery rows found by their keys)
        chains = rows_of_phone([d.c.run_id, d.c.batch_no], f.phone, _phone_keys(f.phone), by_key=by_key)
        where.append(sa.tuple_(e.c.run_id, e.c.batch).in_(chains))
    return where


class AuditLog:
    """The ledger as auditors read it; reached as ``store.audit``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    # ------------------------------------------------------------------ verify

    def run_ids(self, run_id: str | None = None) -> list[str]:
        """Every run's id in creation order (or only ``run_id``'s, if it exists)."""
        with self._db.read() as conn:
            query = sa.select(t.runs.c.id).order_by(t.runs.c.created_at, t.runs.c.id)
            if run_id is not None:
                query = query.where(t.runs.c.id == run_id)
            return [i for (i,) in conn.execute(query)]

    def verify_run(self, run_id: str) -> tuple[int, ledger.Break | None]:
        """How many events the run's chains hold (its own and its batches'), and the first break found
        in them (None: intact)."""
        with self._db.read() as conn:
            run = conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).one()
            problem = ledger.verify_run(conn, run)
            lt = t.ledger_tails
            in_batches = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(lt.c.ledger_seq + 1), 0)).where(lt.c.run_id == run_id)
            ).scalar_one()
        return (0 if run.ledger_seq is None else run.ledger_seq + 1) + int(in_batches), problem

    def verify_audit_chain(self) -> tuple[int, ledger.Break | None]:
        """The same for the audit chain (exports, searches by phone)."""
        with self._db.read() as conn:
            problem = ledger.verify_chain(conn, ledger.AUDIT_CHAIN)
            tail = conn.execute(
                sa.select(t.ledger_chains.c.ledger_seq).where(t.ledger_chains.c.id == ledger.AUDIT_CHAIN)
            ).scalar()
        return (0 if tail is None else tail + 1), problem

    def verify_side_chain(self, chain_id: str) -> tuple[int, ledger.Break | None]:
        """The same for a chain that belongs to no run (an alert's)."""
        with self._db.read() as conn:
            problem = ledger.verify_chain(conn, chain_id)
            tail = conn.execute(
                sa.select(t.ledger_chains.c.ledger_seq).where(t.ledger_chains.c.id == chain_id)
            ).scalar()
        return (0 if tail is None else tail + 1), problem

    # ------------------------------------------------------------------ the log

    def events(self, f: EventQuery, *, limit: int | None = None, chunk: int = 5000) -> Iterator[dict[str, Any]]:
        """Matching delivery state changes (oldest first), unmasked, ``at`` in UTC; one page in memory at a time.

        Two streams merged in event order: events about one delivery each, and the rows of workers'
        batch results (``batch.recorded``), one item per delivery the event names, all with that
        event's id. Claims (``batch.claimed``: pending -> sending) are not listed, as ever.
        """
        merged = heapq.merge(
            self._single_events(f, limit, chunk),
            self._batch_rows(f, chunk),
            key=itemgetter("event_id", "delivery_id"),
        )
        for item in merged if limit is None else itertools.islice(merged, limit):
            item["at"] = _utc(item["at"])
            yield item

    def _single_events(self, f: EventQuery, limit: int | None, chunk: int) -> Iterator[dict[str, Any]]:
        e, d, r = t.events, t.deliveries, t.runs
        cols = [
            e.c.id.label("event_id"), e.c.delivery_id, e.c.at, e.c.run_id, r.c.campaign_id, r.c.owner, e.c.key,
            d.c.phone, d.c.district, d.c.grid, e.c.from_state, e.c.to_state, d.c.gateway, e.c.provider_id,
            e.c.error_code, e.c.reason, e.c.actor,
        ]  # fmt: skip
        base = (
            sa.select(*cols)
            .select_from(e.join(d, d.c.id == e.c.delivery_id).join(r, r.c.id == e.c.run_id))
            .where(*_where(f))
        )
        for row in self._pages(base, e.c.id, "event_id", limit, chunk):
            yield dict(row)

    def _batch_rows(self, f: EventQuery, chunk: int) -> Iterator[dict[str, Any]]:
        """The rows of matching ``batch.recorded`` events, in event order and delivery-id order within one.

        The events are read a page at a time; their rows' deliveries (number, district, gateway), with
        the district, group and number filters, one query per ``chunk`` rows named.
        """
        e, r = t.events, t.runs
        cols = [
            e.c.id.label("event_id"), e.c.at, e.c.run_id, r.c.campaign_id, r.c.owner, e.c.from_state, e.c.actor,
            e.c.payload,
        ]  # fmt: skip
        where = _batch_where(f, by_key=self._db.is_sqlite)
        base = sa.select(*cols).select_from(e.join(r, r.c.id == e.c.run_id)).where(*where)
        pending: list[tuple[Any, list[ledger.RowChange]]] = []
        named = 0
        # not limited here: an event's rows may all fail the delivery filters; the merge stops reading
        for event in self._pages(base, e.c.id, "event_id", None, chunk):
            changes = [
                c
                for c in ledger.row_changes(ledger.RECORD_KIND, event["from_state"], None, event["payload"])
                if (not f.state or c.to_state == f.state) and (not f.error_code or c.error_code == f.error_code)
            ]
            if not changes:
                continue
            pending.append((event, changes))
            named += len(changes)
            if named >= chunk:
                yield from self._expand(f, pending)
                pending, named = [], 0
        yield from self._expand(f, pending)

    def _expand(self, f: EventQuery, events: list[tuple[Any, list[ledger.RowChange]]]) -> Iterator[dict[str, Any]]:
        """One item per row of these batch events whose delivery passes the delivery filters."""
        if not events:
            return
        d = t.deliveries
        ids = [c.delivery_id for _, changes in events for c in changes]
        with self._db.read() as conn:
            rows = {
                row.id: row
                for row in conn.execute(
                    sa.select(d.c.id, d.c.key, d.c.phone, d.c.district, d.c.grid, d.c.gateway).where(
                        d.c.id.in_(ids), *_delivery_where(f)
                    )
                )
            }
        for event, changes in events:
            for c in changes:
                row = rows.get(c.delivery_id)
                if row is None:
                    continue
                yield {
                    "event_id": event["event_id"], "delivery_id": c.delivery_id, "at": event["at"],
                    "run_id": event["run_id"], "campaign_id": event["campaign_id"], "owner": event["owner"],
                    "key": row.key, "phone": row.phone, "district": row.district, "grid": row.grid,
                    "from_state": c.from_state, "to_state": c.to_state, "gateway": row.gateway,
                    "provider_id": c.provider_id, "error_code": c.error_code, "reason": c.reason,
                    "actor": event["actor"],
                }  # fmt: skip

    def _pages(self, base: Any, order: Any, label: str, limit: int | None, chunk: int) -> Iterator[Any]:
        """Rows of ``base`` in ``order`` (selected as ``label``) with one page in memory at a time.

        PostgreSQL: one query on a server-side cursor (psycopg fetches ``chunk`` rows per
        round trip), so the plan runs once instead of once per page. SQLite: keyset pages,
        each a short read, so an export never pins the WAL against checkpoints.
        """
        if not self._db.is_sqlite:
            query = base.order_by(order) if limit is None else base.order_by(order).limit(limit)
            with self._db.read() as conn:
                result = conn.execution_options(stream_results=True, yield_per=chunk).execute(query)
                yield from result.mappings()
            return
        last = 0
        left = limit
        while left is None or left > 0:
            page = chunk if left is None else min(chunk, left)
            with self._db.read() as conn:
                rows = conn.execute(base.where(order > last).order_by(order).limit(page)).mappings().all()
            if not rows:
                return
            yield from rows
            last = rows[-1][label]
            if left is not None:
                left -= len(rows)

    # ------------------------------------------------------------------ the audit chain

    def append(self, kind: str, *, actor: str, payload: dict[str, Any]) -> None:
        """Append one event to the audit chain (who exported or searched what)."""
        with self._db.write() as conn:
            ledger.append(conn, ledger.AUDIT_CHAIN, [ledger.Event(kind, actor=actor, payload=payload)], self._db.now())

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit-chain events, newest first, ``at`` in UTC and ``payload`` decoded."""
        e = t.events
        with self._db.read() as conn:
            rows = (
                conn.execute(
                    sa.select(e.c.id, e.c.seq, e.c.kind, e.c.actor, e.c.at, e.c.payload)
                    .where(e.c.run_id == ledger.AUDIT_CHAIN)
                    .order_by(e.c.id.desc())
                    .limit(limit)
                )
                .mappings()
                .all()
            )
        return [{**dict(row), "at": _utc(row["at"]), "payload": json.loads(row["payload"] or "{}")} for row in rows]
