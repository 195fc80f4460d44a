"""Batch leases: how a worker holds the rows of a batch it sends without writing each row twice.

A claim used to move every row of its batch to ``sending`` and the result moved it on: two new
versions of each row, each writing an entry into every index of ``deliveries``. A lease is one row in
``batch_leases`` naming the rows it took; they stay ``pending`` in ``deliveries`` until their results
are recorded, which writes each row once (with the claim's token, holder and time, as before). The
ledger does not change: the claim's ``batch.claimed`` event says the rows went to ``sending``, and
the result's ``batch.recorded`` event says where they went from there.

Whoever else must act on the rows first *materializes* the lease: it moves the rows to ``sending``
under the lease's token, holder and ``claimed_at``, counts their attempt, and deletes the lease, in
one transaction. From there every other path (orphans, requeue, reconcile, cancel, a restore run)
finds the rows exactly as a claim used to leave them. A materialization is fenced on the lease's
``claimed_at`` as read, so between it and the holder's renewal exactly one wins. The holder's own
calls (record, release, renew, check) accept either form: its lease, or its rows in ``sending``.

While a lease is live nobody but its holder moves its rows, so its ids are exactly the rows still
to record; readers that count (status, progress, the frequency cap, ``audit verify``) count them
as ``sending``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from . import schema as t
from .base import PENDING, SENDING


@dataclass(frozen=True)
class Lease:
    token: str
    run_id: str
    batch_no: int
    claimed_by: str
    #: as stored (compared as read, to fence a takeover on it)
    claimed_at: datetime
    ids: frozenset[int]


def _columns() -> tuple[Any, ...]:
    b = t.batch_leases
    return (b.c.token, b.c.run_id, b.c.batch_no, b.c.claimed_by, b.c.claimed_at, b.c.ids)


def _lease(row: Any) -> Lease:
    token, run_id, batch_no, claimed_by, claimed_at, ids = row
    return Lease(token, run_id, int(batch_no), claimed_by, claimed_at, frozenset(int(i) for i in ids.split(",") if i))


def take(conn: Connection, run_id: str, batch_no: int, token: str, worker_id: str, now: datetime) -> bool:
    """Lease the batch (its rows are named next, by ``hold``); False if another lease holds it.

    On PostgreSQL a lease being taken or ended by another transaction is waited for, so a batch's
    leases follow one another, each taken after the last one's results committed.
    """
    b = t.batch_leases
    insert = sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert
    taken = conn.execute(
        insert(b)
        .values(run_id=run_id, batch_no=batch_no, token=token, claimed_by=worker_id, claimed_at=now, ids="")
        .on_conflict_do_nothing()
        # by what it returns: psycopg gives no row count for an INSERT that SQLAlchemy runs as it does this one
        .returning(b.c.token)
    ).first()
    return taken is not None


def hold(conn: Connection, token: str, ids: Sequence[int]) -> None:
    """Name the rows the lease holds (ascending ids)."""
    b = t.batch_leases
    conn.execute(sa.update(b).where(b.c.token == token).values(ids=",".join(str(i) for i in ids)))


def held(conn: Connection, token: str, *, lock: bool = False) -> Lease | None:
    """The live lease with ``token``, if any; ``lock`` holds it until the transaction ends (PostgreSQL)."""
    query = sa.select(*_columns()).where(t.batch_leases.c.token == token)
    if lock and conn.dialect.name != "sqlite":
        query = query.with_for_update()
    row = conn.execute(query).first()
    return None if row is None else _lease(row)


def of_run(conn: Connection, run_id: str, *, lock: bool = False) -> list[Lease]:
    query = sa.select(*_columns()).where(t.batch_leases.c.run_id == run_id).order_by(t.batch_leases.c.batch_no)
    if lock and conn.dialect.name != "sqlite":
        query = query.with_for_update()
    return [_lease(row) for row in conn.execute(query)]


def all_of(conn: Connection, run_ids: Sequence[str]) -> list[Lease]:
    query = sa.select(*_columns()).where(t.batch_leases.c.run_id.in_(list(run_ids)))
    return [_lease(row) for row in conn.execute(query)]


def in_flight(leases: Iterable[Lease]) -> int:
    return sum(len(lease.ids) for lease in leases)


def as_sending(counts: dict[str, int], n: int) -> dict[str, int]:
    """Counts by state with ``n`` leased rows moved from ``pending`` to ``sending``."""
    n = min(n, counts.get(PENDING, 0))
    if not n:
        return counts
    out = dict(counts)
    out[SENDING] = out.get(SENDING, 0) + n
    out[PENDING] -= n
    if not out[PENDING]:
        del out[PENDING]
    return out


def renew(conn: Connection, token: str, now: datetime) -> Lease | None:
    """Move the lease's ``claimed_at`` to ``now``; None if it is no longer live."""
    b = t.batch_leases
    row = conn.execute(sa.update(b).where(b.c.token == token).values(claimed_at=now).returning(*_columns())).first()
    return None if row is None else _lease(row)


def end(conn: Connection, token: str) -> None:
    conn.execute(sa.delete(t.batch_leases).where(t.batch_leases.c.token == token))


def materialize(conn: Connection, lease: Lease, now: datetime) -> int:
    """Turn the lease into its rows in ``sending``, as a claim used to leave them; returns the rows moved
    (0, and nothing done, if the lease was renewed or ended since it was read)."""
    b, d = t.batch_leases, t.deliveries
    gone = conn.execute(sa.delete(b).where(b.c.token == lease.token, b.c.claimed_at == lease.claimed_at)).rowcount
    if not gone:
        return 0
    moved = 0
    ids = sorted(lease.ids)
    for start in range(0, len(ids), 5000):
        moved += conn.execute(
            sa.update(d)
            .where(d.c.id.in_(ids[start : start + 5000]), d.c.state == PENDING)
            .values(
                state=SENDING,
                claim_token=lease.token,
                claimed_by=lease.claimed_by,
                claimed_at=lease.claimed_at,
                attempts=d.c.attempts + 1,
                updated_at=now,
            )
        ).rowcount
    return moved


def materialize_held(conn: Connection, token: str | None, now: datetime) -> None:
    """The holder's own lease turned into its rows in ``sending`` before it moves some of them (a release, a
    cancel): those moves are rare, and written from ``sending`` they are what they always were."""
    if token is not None and (lease := held(conn, token, lock=True)) is not None:
        materialize(conn, lease, now)


def materialize_run(conn: Connection, run_id: str, now: datetime) -> int:
    """Materialize every live lease of the run (before cancelling it, or reading which rows may have left)."""
    return sum(materialize(conn, lease, now) for lease in of_run(conn, run_id, lock=True))
