"""Two operation groups of the store: run control, and coordination between processes.

- ``RunControl`` (``store.control``): pause, halt, cancel-claimed and the cheap reads
  workers and the watchdog poll (status, halt reason, progress, running runs). Every
  delivery state change here goes through ``_rows.transition`` so the ledger records it
  in the same transaction.
- ``Coordination`` (``store.coordination``): what keeps processes and runs from stepping
  on each other: operator locks, the scheduler's lease, fences and recorded fires,
  markers, and the cross-run reads behind the frequency cap and the repeat guard.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError

from ..errors import StoreError
from . import _leases as leases
from . import schema as t
from ._db import Db, advisory_key
from ._rows import transition
from .base import CANCELLED, DELIVERED, PENDING, SENDING, SENT, UNCONFIRMED

#: states in which a message counts against a person's frequency cap (it reached the gateway)
CAPPED_STATES = (SENT, DELIVERED, UNCONFIRMED)


@functools.lru_cache(maxsize=4)
def _bulk_sends_query(is_sqlite: bool, excluding: bool) -> Any:
    """The frequency cap's count per resident (``Coordination.bulk_sends_since``), built once: it is asked
    for every batch, and building the expression cost as much as running it. Parameters: ``ids`` (the
    residents), ``since`` and, when ``excluding``, ``exclude_run``."""
    d, r, b = t.deliveries, t.runs, t.batch_leases
    since = sa.bindparam("since", type_=d.c.sent_at.type)
    among: Any
    if is_sqlite:
        among = d.c.resident_id.in_(sa.bindparam("ids", expanding=True))
    else:
        from sqlalchemy.dialects import postgresql

        among = d.c.resident_id == sa.any_(sa.cast(sa.bindparam("ids", type_=sa.Text), postgresql.ARRAY(sa.BigInteger)))
    where = [
        among,
        # a number outside the registry (resident 0) is nobody's to cap; written as a constant, so that
        # PostgreSQL's planner, which must prove it, may read the residents' index (``resident_id <> 0``)
        d.c.resident_id != sa.literal_column("0"),
        # a message another run has claimed but not yet recorded counts too: of two runs
        # checking the same person at once, each sees the other's claim (claims commit
        # before the check), so together they can fall short of the cap but never exceed it
        sa.or_(
            # one parameter per state, not an expanding IN: that one is rendered again on every call
            sa.and_(sa.or_(*(d.c.state == state for state in CAPPED_STATES)), d.c.sent_at >= since),
            sa.and_(d.c.state == SENDING, d.c.claimed_at >= since),
            # a leased row reads pending: its batch's lease says it is claimed (a row of the batch
            # not yet due counts too, which can only make the cap stricter)
            sa.and_(
                d.c.state == PENDING,
                sa.exists().where(b.c.run_id == d.c.run_id, b.c.batch_no == d.c.batch_no, b.c.claimed_at >= since),
            ),
        ),
        r.c.priority == "bulk",
    ]
    if excluding:
        where.append(d.c.run_id != sa.bindparam("exclude_run", type_=d.c.run_id.type))
    return (
        select(d.c.resident_id, func.count())
        .select_from(d.join(r, r.c.id == d.c.run_id))
        .where(*where)
        .group_by(d.c.resident_id)
    )


@dataclass(frozen=True)
class RunProgress:
    """How far a run has got: when any row last moved, rows due to be sent now, rows in flight."""

    last_progress: datetime | None
    due: int
    sending: int


@dataclass(frozen=True)
class RecentRun:
    """A run of a campaign counted against its frequency period."""

    id: str
    status: str
    created_at: datetime
    fire_time: datetime | None


@dataclass(frozen=True)
class FireRecord:
    """What the scheduler recorded for one fire time of a campaign: fired (with its run) or skipped (why)."""

    id: int
    campaign_id: str
    fire_time: datetime
    status: str
    run_id: str | None
    reason: str | None
    scheduler: str
    recorded_at: datetime
    #: the leader's fencing token when it fired
    lease_token: int | None


class RunControl:
    """Pause, halt and cancel-claimed, and the run reads workers and the watchdog poll, over one ``Db``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    # ------------------------------------------------------------------ pause / resume / cancel

    def pause_run(self, run_id: str) -> bool:
        """Mark a running run paused; workers stop claiming its rows. False if it was not running."""
        with self._db.write() as conn:
            moved = conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status.in_(("running", "creating")))
                .values(status="paused")
            ).rowcount
        return bool(moved)

    def unpause_run(self, run_id: str) -> bool:
        with self._db.write() as conn:
            moved = conn.execute(
                sa.update(t.runs).where(t.runs.c.id == run_id, t.runs.c.status == "paused").values(status="running")
            ).rowcount
        return bool(moved)

    def run_status(self, run_id: str) -> str | None:
        """Only the status: workers poll it between sends, so it must be cheap."""
        with self._db.read_one() as conn:
            return conn.execute(select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar_one_or_none()

    def cancel_claimed(self, ids: Sequence[int], actor: str, token: str | None = None) -> int:
        """Rows a worker claimed but had not handed to the gateway when the run was cancelled."""
        if not ids:
            return 0
        with self._db.write() as conn:
            leases.materialize_held(conn, token, self._db.now())
            return transition(
                conn,
                self._db.now(),
                ids,
                SENDING,
                CANCELLED,
                actor=actor,
                reason="cancelled",
                values={"reason": "cancelled", "claim_token": None},
                token=token,
            )

    # ------------------------------------------------------------------ halts, progress

    def halt_run(self, run_id: str, why: str) -> bool:
        """Pause a run that cannot go on by itself (its outbox or log cannot be written), saying why."""
        with self._db.write() as conn:
            moved = conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status.in_(("running", "creating", "paused")))
                .values(status="paused", halted=why[:500])
            ).rowcount
        return bool(moved)

    def clear_halt(self, run_id: str) -> None:
        with self._db.write() as conn:
            conn.execute(sa.update(t.runs).where(t.runs.c.id == run_id).values(halted=None))

    def run_halted(self, run_id: str) -> str | None:
        with self._db.read() as conn:
            return conn.execute(select(t.runs.c.halted).where(t.runs.c.id == run_id)).scalar_one_or_none()

    def progress(self, run_id: str) -> RunProgress:
        """Rows waiting to be sent now, rows in flight, and when any row of the run last moved."""
        d = t.deliveries
        now = self._db.now()
        with self._db.read() as conn:
            last, due, sending = conn.execute(
                select(
                    func.max(d.c.updated_at),
                    func.sum(
                        sa.case(
                            (
                                sa.and_(
                                    d.c.state == "pending",
                                    sa.or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now),
                                ),
                                1,
                            ),
                            else_=0,
                        )
                    ),
                    func.sum(sa.case((d.c.state == SENDING, 1), else_=0)),
                ).where(d.c.run_id == run_id)
            ).one()
            # a live lease's rows read as pending and due, but are in flight; taking or renewing it is progress
            held = leases.of_run(conn, run_id)
        n = min(leases.in_flight(held), int(due or 0))
        moved = [_utc(lease.claimed_at) for lease in held]
        last = max((at for at in [_utc(last), *moved] if at is not None), default=None)
        return RunProgress(last, int(due or 0) - n, int(sending or 0) + n)

    def running_runs(self) -> list[str]:
        with self._db.read() as conn:
            return [i for (i,) in conn.execute(select(t.runs.c.id).where(t.runs.c.status == "running"))]


class Coordination:
    """Operator locks, the scheduler's lease, fences, fires and markers, and cross-run caps over one ``Db``.

    ``lock_base`` is the SQLite file the operator locks sit beside (None: in memory, no lock
    needed because no other process can open the log).
    """

    def __init__(self, db: Db, lock_base: str | None) -> None:
        self._db = db
        self._lock_base = lock_base

    # ------------------------------------------------------------------ repeats

    def recent_runs(self, campaign_id: str, since: datetime) -> list[RecentRun]:
        """Runs of a campaign created since ``since`` that were not cancelled (a repeat would message them again)."""
        r = t.runs
        with self._db.read() as conn:
            rows = conn.execute(
                select(r.c.id, r.c.status, r.c.created_at, r.c.fire_time)
                .where(r.c.campaign_id == campaign_id, r.c.created_at >= since, r.c.status != "cancelled")
                .order_by(r.c.created_at)
            )
            return [RecentRun(row.id, row.status, row.created_at, row.fire_time) for row in rows]

    # ------------------------------------------------------------------ operator locks

    @contextmanager
    def operator_lock(self, name: str, wait: float = 30.0) -> Iterator[None]:
        """Hold a lock named ``name`` (a campaign) across processes while an operator command changes it.

        PostgreSQL: a session advisory lock on a connection held for the duration (released by the
        server if the process dies). SQLite: ``flock`` on a file beside the database (released by
        the kernel if the process dies). Waits up to ``wait`` seconds, then says who is in the way.
        """
        deadline = time.monotonic() + wait
        if not self._db.is_sqlite:
            key = advisory_key(name)
            with self._db.engine.connect() as conn:
                try:
                    while not conn.execute(select(func.pg_try_advisory_lock(key))).scalar_one():
                        if time.monotonic() > deadline:
                            raise StoreError(f"another dispatch command is working on {name}; try again when it ends")
                        time.sleep(0.2)
                    conn.commit()
                    try:
                        yield
                    finally:
                        conn.execute(select(func.pg_advisory_unlock(key)))
                        conn.commit()
                except (OperationalError, sa.exc.InterfaceError) as exc:
                    raise StoreError(f"could not take the lock on {name}: {exc.orig or exc}") from exc
            return
        path = self._lock_path(name)
        if path is None:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() > deadline:
                        message = f"another dispatch command is working on {name}; try again when it ends"
                        raise StoreError(message) from exc
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)

    def _lock_path(self, name: str) -> str | None:
        if self._lock_base is None:
            return None
        return f"{self._lock_base}.lock-{hashlib.sha256(name.encode()).hexdigest()[:12]}"

    # ------------------------------------------------------------------ scheduler fencing

    def take_fence(self, name: str, holder: str) -> int:
        """Make ``holder`` the fenced leader (bumping the token if it was someone else); returns the token.

        Runs with a short lock timeout so a frozen process holding the row never blocks the caller.
        """
        f = t.leader_fences
        now = datetime.now(UTC)
        with self._db.write_short() as conn:
            row = conn.execute(select(f.c.holder, f.c.token).where(f.c.name == name)).first()
            if row is None:
                stmt = self._db.insert()(f).values(name=name, holder=holder, token=1, updated_at=now)
                if conn.execute(stmt.on_conflict_do_nothing()).rowcount:
                    return 1
                row = conn.execute(select(f.c.holder, f.c.token).where(f.c.name == name)).one()
            if row.holder == holder:
                return int(row.token)
            token = int(row.token) + 1
            conn.execute(
                sa.update(f)
                .where(f.c.name == name, f.c.token == row.token)
                .values(holder=holder, token=token, updated_at=now)
            )
            return token

    def get_marker(self, name: str) -> str | None:
        """A small named value kept beside the fences (the broker sentinel the watchdog checks)."""
        f = t.leader_fences
        with self._db.read() as conn:
            return conn.execute(select(f.c.holder).where(f.c.name == name)).scalar_one_or_none()

    def set_marker(self, name: str, value: str) -> None:
        f = t.leader_fences
        now = datetime.now(UTC)
        stmt = self._db.insert()(f).values(name=name, holder=value, token=0, updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[f.c.name], set_={"holder": value, "updated_at": now})
        with self._db.write_short() as conn:
            conn.execute(stmt)

    # ------------------------------------------------------------------ frequency cap

    def bulk_sends_since(
        self, resident_ids: Sequence[int], since: datetime, exclude_run: str | None = None
    ) -> dict[int, int]:
        """How many bulk messages each resident was sent (or is being sent) since ``since``, across all runs.

        Asked once per batch with the batch's residents, straight on ``deliveries`` by its resident
        index. Asked by phone, it joined ``residents`` first, and PostgreSQL read 500 phones against a
        large registry by scanning it whole (in parallel): 33 ms a batch at 300,000 residents, growing
        with the registry, the largest share of the database's work per recipient.
        """
        if not resident_ids:
            return {}
        ids = sorted(set(resident_ids))
        params: dict[str, object] = {"since": since}
        if exclude_run is not None:
            params["exclude_run"] = exclude_run
        if self._db.is_sqlite:
            params["ids"] = ids
        else:
            # an array literal in one text parameter: psycopg dumps a list of 500 ints in Python, a tenth
            # of this call's cost; ints cannot need quoting
            params["ids"] = "{" + ",".join(map(str, ids)) + "}"
        with self._db.read_one() as conn:
            return {
                int(resident): int(n)
                for resident, n in conn.execute(_bulk_sends_query(self._db.is_sqlite, exclude_run is not None), params)
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
        lease_token: int | None = None,
    ) -> bool:
        """Remember one handled fire; False if it was recorded already (another leader, a retry)."""
        try:
            with self._db.write() as conn:
                conn.execute(
                    sa.insert(t.schedule_fires).values(
                        campaign_id=campaign_id,
                        fire_time=fire_time,
                        status=status,
                        run_id=run_id,
                        reason=reason,
                        scheduler=scheduler,
                        recorded_at=self._db.now(),
                        lease_token=lease_token,
                    )
                )
        except IntegrityError:
            return False
        return True

    def last_fire(self, campaign_id: str) -> datetime | None:
        with self._db.read() as conn:
            value = conn.execute(
                select(func.max(t.schedule_fires.c.fire_time)).where(t.schedule_fires.c.campaign_id == campaign_id)
            ).scalar_one()
        return _utc(value)

    def fire_recorded(self, campaign_id: str, fire_time: datetime) -> bool:
        f = t.schedule_fires
        with self._db.read() as conn:
            query = select(f.c.id).where(f.c.campaign_id == campaign_id, f.c.fire_time == fire_time)
            return conn.execute(query).first() is not None

    def list_fires(self, campaign_id: str | None = None, limit: int = 1000) -> list[FireRecord]:
        f = t.schedule_fires
        query = select(f).order_by(f.c.fire_time).limit(limit)
        if campaign_id:
            query = query.where(f.c.campaign_id == campaign_id)
        with self._db.read() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        return [
            FireRecord(**{**row, "fire_time": _utc(row["fire_time"]), "recorded_at": _utc(row["recorded_at"])})
            for row in rows
        ]

    def run_for_fire(self, campaign_id: str, fire_time: datetime) -> str | None:
        with self._db.read() as conn:
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
        with self._db.write_short() as conn:
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
            stmt = self._db.insert()(lease).values(name=name, holder=holder, expires_at=expires)
            stmt = stmt.on_conflict_do_nothing()
            return bool(conn.execute(stmt).rowcount)

    # ------------------------------------------------------------------ rate schedule (no Redis)

    def reserve_slot(self, name: str, cost_us: int) -> int:
        """Reserve the next send slot of schedule ``name`` (GCRA); returns microseconds to wait for it.

        One statement: ``tat = max(tat, now) + cost``, returning the slot it reserved. PostgreSQL
        locks the row for the upsert, so concurrent callers on every host queue up behind each other,
        and ``now`` is the server's clock (``clock_timestamp()``), so the hosts' clocks need not
        agree. SQLite is one host's file and serialises writers; its ``now`` (read once per statement,
        to the millisecond) is taken once the write lock is held, so a wait for the lock is not paced twice.
        """
        if self._db.is_sqlite:
            now = "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"
            stmt = (
                f"INSERT INTO rate_schedules (name, tat_us) VALUES (:name, {now} + :cost) "
                f"ON CONFLICT (name) DO UPDATE SET tat_us = MAX(rate_schedules.tat_us, {now}) + :cost "
                f"RETURNING tat_us - :cost - {now}"
            )
        else:
            now = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
            stmt = (
                f"WITH c AS (SELECT {now} AS now_us) "
                "INSERT INTO rate_schedules (name, tat_us) SELECT :name, c.now_us + :cost FROM c "
                "ON CONFLICT (name) DO UPDATE SET tat_us = GREATEST(rate_schedules.tat_us, "
                "(SELECT now_us FROM c)) + :cost "
                "RETURNING tat_us - :cost - (SELECT now_us FROM c)"
            )
        with self._db.write() as conn:
            if not self._db.is_sqlite:
                # the wait is counted from the server's ``now``: the sender sleeps it only once the commit
                # is back, so a slow commit (a WAL flush) sends late and bunches sends. The schedule needs
                # no durability: one lost in a crash only restarts the pacing from now.
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            wait = conn.execute(sa.text(stmt), {"name": name, "cost": int(cost_us)}).scalar_one()
        return max(0, int(wait))

    def release_lease(self, name: str, holder: str) -> None:
        lease = t.scheduler_leases
        with self._db.write() as conn:
            conn.execute(sa.delete(lease).where(lease.c.name == name, lease.c.holder == holder))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def fence_holds(conn: Connection, name: str, holder: str, token: int, *, is_sqlite: bool) -> bool:
    """Inside the caller's transaction: is ``holder`` with ``token`` still the fenced leader?

    A function, not a group method: it runs inside another operation's transaction (``create_run``),
    so it takes that connection, which never leaves the package.
    """
    f = t.leader_fences
    query = select(f.c.holder, f.c.token).where(f.c.name == name)
    if not is_sqlite:
        query = query.with_for_update()
    row = conn.execute(query).first()
    return row is not None and row.holder == holder and int(row.token) == token
