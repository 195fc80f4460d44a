"""The delivery log on SQLAlchemy Core: SQLite (WAL, the local default) or PostgreSQL.

Design points:
- Fan-out is one ``INSERT ... SELECT`` in the database: the audience is never
  loaded into Python, and each row gets its batch number from ``ROW_NUMBER()``.
- A worker claims a batch with one conditional ``UPDATE ... WHERE state='pending'``
  stamped with a fresh claim token; a redelivered Dramatiq message finds nothing
  left to claim, so at-least-once delivery never becomes at-least-twice sending.
- Results are written back in bulk (``executemany``) once per batch. A crash
  between sending and recording leaves rows in ``sending``; ``resume`` asks the
  gateway which of those keys went out instead of guessing.
- On SQLite, write transactions start with ``BEGIN IMMEDIATE`` so that two
  worker processes queue for the write lock instead of failing on upgrade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, func, literal, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from ..errors import StoreError, UsageError
from ..keys import delivery_key_prefix
from ..redact import scrub, scrub_optional
from . import _leases as leases
from . import ledger
from . import schema as t
from ._accounts import Accounts
from ._alerts import Alerts
from ._approvals import Approvals, still_approved
from ._audit import AuditLog
from ._bulk import insert_rows, update_where_held
from ._dashboard import DashboardReads
from ._db import WAL_AUTOCHECKPOINT, Db, advisory_key, one_line
from ._reports import ReportReads
from ._rows import (
    as_utc,
    attempt_row,
    delivery_row,
    head_payload,
    insert_run,
    keys_digest,
    keys_digest_sql,
    transition,
)
from ._traces import TraceReads
from ._voice import VoiceCalls
from .base import (
    CANCELLED,
    FAILED,
    HANDED_OVER_STATES,
    OPEN_STATES,
    PENDING,
    SENDING,
    SENT,
    SKIPPED,
    UNKNOWN,
    AttemptRow,
    AudienceFilter,
    Claimed,
    CreatedRun,
    DeliveryRow,
    Outcome,
    Resident,
    RunRecord,
    RunSpec,
)
from .control import Coordination, RunControl, fence_holds
from .provider import ProviderEvents, Ringback

Clock = Callable[[], datetime]

#: The PostgreSQL advisory lock that serialises schema creation and upgrades across processes
_SCHEMA_LOCK_KEY = advisory_key("dispatch schema")


def utcnow() -> datetime:
    return datetime.now(UTC)


class LeaseLost(StoreError):
    """A scheduler tried to fire after another process took over its leadership."""


class DuplicateRun(StoreError):
    """A run for this (campaign, fire time) exists already: the fire was a duplicate."""

    def __init__(self, campaign_id: str, fire_time: datetime | None) -> None:
        super().__init__(f"campaign {campaign_id} already has a run for fire time {fire_time}")
        self.campaign_id = campaign_id
        self.fire_time = fire_time


def _sqlite_engine(url: str) -> Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # let SQLAlchemy's begin event decide how transactions start (deferred or immediate)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # commits leave the checkpoint to ``Db`` (after the writer's turn) up to this many pages of log
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        # a lease renewal waits only briefly for the write lock: a frozen leader's transaction must
        # not stall every follower for a minute
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(options.get('sqlite_busy_ms', 60000))}")
        conn.exec_driver_sql(options.get("sqlite_begin", "BEGIN"))

    return engine


def create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return _sqlite_engine(url)
    # executemany stays psycopg's pipelined executemany: measured 7.5 ms per 500 ledger events,
    # against 30 ms with SQLAlchemy's insertmanyvalues (use_insertmanyvalues_wo_returning).
    # A worker uses a connection per busy thread at once (4 bulk and 2 urgent by default, the
    # heartbeat): with a pool of 5, those opened beyond it were closed when given back and opened
    # again for a later batch, each a new PostgreSQL backend to start. Kept open, `make bench` sent
    # about 5 % more a second for about 6 % less of PostgreSQL's CPU per recipient
    engine = sa.create_engine(url, pool_size=10, max_overflow=5)
    _ping_when_idle(engine)
    return engine


#: seconds a pooled PostgreSQL connection may lie unused before it is pinged on its way out
IDLE_BEFORE_PING = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it has lain unused for ``IDLE_BEFORE_PING`` seconds.

    ``pool_pre_ping`` pinged on every checkout: a round trip before each transaction, about 10 of a
    worker's 30-odd a batch. A server restarted while a connection lay idle is still found out before
    anyone uses it, and the pool replaces the connection (``DisconnectionError``). A connection in steady
    use is not pinged: if the server goes away between two uses, that use fails, SQLAlchemy discards every
    connection made before the failure, and the caller's failure path (a result spooled, a message
    retried) is the one a failure between ping and use always took.
    """

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < IDLE_BEFORE_PING:
            return  # just opened, or in steady use
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # any failure: the pool opens a new connection in its place
            raise sa.exc.DisconnectionError(one_line(exc)) from exc


class SqlStore:
    """The delivery log. One instance per process; thread-safe through SQLAlchemy's pool."""

    def __init__(
        self, url: str, *, clock: Clock = utcnow, reporter_gateways: Mapping[str, tuple[str, ...]] | None = None
    ) -> None:
        self.url = url
        self.clock = clock
        try:
            self.engine = create_engine(url)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"cannot open the delivery log at {_safe_url(url)}: {exc}") from exc
        self._db = Db(self.engine, lambda: self.clock())
        self.is_sqlite = self._db.is_sqlite
        self._secrets: dict[str, bytes] = {}
        #: when each worker's heartbeat was last refreshed by one of its claims (see ``_prove_alive``)
        self._proved: dict[str, datetime] = {}
        # the operation groups: the store's public face beside its own run/delivery/claim operations
        self.control = RunControl(self._db)
        self.coordination = Coordination(self._db, _lock_base(url))
        self.provider_events = ProviderEvents(self._db, reporter_gateways)
        self.ringback = Ringback(self._db)
        self.voice = VoiceCalls(self._db, reporter_gateways)
        self.reports = ReportReads(self._db)
        self.audit = AuditLog(self._db)
        self.accounts = Accounts(self._db)
        self.approvals = Approvals(self._db)
        self.dashboard = DashboardReads(self._db)
        self.traces = TraceReads(self._db)
        self.alerts = Alerts(self._db)

    # ------------------------------------------------------------------ plumbing

    def _write(self) -> AbstractContextManager[Connection]:
        return self._db.write()

    def _write_short(self) -> AbstractContextManager[Connection]:
        """A write that gives up after about two seconds of waiting for a lock (leases, fences)."""
        return self._db.write_short()

    def _read(self) -> AbstractContextManager[Connection]:
        return self._db.read()

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Create the schema if missing, upgrade an older one; refuse a database written by a newer program.

        A log already at this version is only read, so a read-only command (``status``) during an
        outage says it could not read, and does not take the write lock on every start.
        """
        try:
            with self.engine.connect() as conn:
                if sa.inspect(conn).has_table(t.meta.name):
                    row = conn.execute(select(t.meta.c.value).where(t.meta.c.key == "schema_version")).first()
                    if row is not None and int(row[0]) == t.SCHEMA_VERSION:
                        return
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(
                f"could not read the delivery log at {_safe_url(self.url)}: {_one_line(exc.orig or exc)}"
            ) from exc
        try:
            with self._write() as conn:
                if not self._db.is_sqlite:
                    # PostgreSQL's CREATE TABLE is not safe to race (two processes starting on a fresh
                    # database both see no table, and the second fails with "relation/type ... already
                    # exists"): the first takes this lock, the others wait, then find the tables made.
                    # SQLite's write turn already serialises the whole transaction.
                    conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
                t.metadata.create_all(conn)
                # the row lock makes a second process wait for the first one's upgrade, then see it done
                version = t.meta.c.key == "schema_version"
                row = conn.execute(select(t.meta.c.value).where(version).with_for_update()).first()
                if row is None:
                    conn.execute(sa.insert(t.meta).values(key="schema_version", value=str(t.SCHEMA_VERSION)))
                elif int(row[0]) > t.SCHEMA_VERSION:
                    raise StoreError(
                        f"the delivery log has schema version {row[0]}; this program knows {t.SCHEMA_VERSION}"
                    )
                elif int(row[0]) < t.SCHEMA_VERSION:
                    self._upgrade(conn, int(row[0]))
                    conn.execute(sa.update(t.meta).where(version).values(value=str(t.SCHEMA_VERSION)))
        except IntegrityError:
            # another process created the schema at the same moment; it is there now
            pass
        except StoreError as exc:
            if "schema version" in str(exc):
                raise
            raise StoreError(f"cannot prepare the delivery log at {_safe_url(self.url)}: {exc}") from exc

    @staticmethod
    def _upgrade(conn: Connection, found: int) -> None:
        """Add the columns and indexes of every version after ``found`` (schema.MIGRATIONS, INDEX_MIGRATIONS)."""
        preparer = conn.dialect.identifier_preparer
        inspector = sa.inspect(conn)
        for target in range(found + 1, t.SCHEMA_VERSION + 1):
            for table_name, column_name in t.MIGRATIONS.get(target, ()):
                if column_name in {c["name"] for c in inspector.get_columns(table_name)}:
                    continue  # an upgrade interrupted after this column, or a log that already has it
                column = t.metadata.tables[table_name].c[column_name]
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(
                    f"ALTER TABLE {preparer.quote(table_name)} ADD COLUMN {preparer.quote(column_name)} {kind}"
                )
            if target == 10:
                _events_unique_per_chain(conn)
            for index_name in t.INDEX_MIGRATIONS.get(target, ()):
                index = next(i for table in t.metadata.tables.values() for i in table.indexes if i.name == index_name)
                index.create(conn, checkfirst=True)  # checkfirst: an interrupted upgrade may have made it
            if target == 12 and conn.dialect.name == "postgresql":
                for table_name, column_name in t.KEY_COLUMNS:
                    conn.exec_driver_sql(
                        f"ALTER TABLE {preparer.quote(table_name)} ALTER COLUMN {preparer.quote(column_name)} "
                        'TYPE VARCHAR(64) COLLATE "C"'
                    )
            if conn.dialect.name == "postgresql":
                for index_name in t.POSTGRES_INDEX_MIGRATIONS.get(target, ()):
                    index = next(i for i in t.deliveries.indexes if i.name == index_name)
                    index.create(conn, checkfirst=True)
                if target == 14:
                    # the indexes above keep each number to one row per run, as this constraint did
                    conn.exec_driver_sql(
                        f"ALTER TABLE deliveries DROP CONSTRAINT IF EXISTS {preparer.quote(t.OLD_KEY_CONSTRAINT)}"
                    )
                    conn.exec_driver_sql(t.SET_DELIVERY_ID_CACHE)
                for index_name in t.POSTGRES_DROPPED.get(target, ()):
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {preparer.quote(index_name)}")
            for index_name in t.DROPPED_INDEXES.get(target, ()):
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {preparer.quote(index_name)}")

    def schema_version(self) -> int:
        with self._read() as conn:
            row = conn.execute(select(t.meta.c.value).where(t.meta.c.key == "schema_version")).first()
        return int(row[0]) if row else 0

    def server_secret(self, name: str) -> bytes:
        """A random 32-byte secret kept in ``dispatch_meta`` under ``secret:<name>``, made on first use.

        Every process that opens this delivery log shares it (phone digests, session signing
        when DISPATCH_SESSION_SECRET is not set); whoever can read the database can read the
        numbers themselves, so keeping it there adds no exposure. Cached per process.
        """
        cache = self._secrets
        if name in cache:
            return cache[name]
        key = f"secret:{name}"
        m = t.meta
        with self._write() as conn:
            conn.execute(self._insert()(m).values(key=key, value=secrets.token_hex(32)).on_conflict_do_nothing())
            value = conn.execute(select(m.c.value).where(m.c.key == key)).scalar_one()
        cache[name] = bytes.fromhex(value)
        return cache[name]

    def _insert(self) -> Any:
        return self._db.insert()

    # ------------------------------------------------------------------ residents

    def upsert_residents(self, rows: Sequence[Resident]) -> int:
        """Insert or update residents by phone (the registry's key); returns rows written."""
        if not rows:
            return 0
        now = self.clock()
        insert = self._insert()
        stmt = insert(t.residents).values(
            [
                {
                    "phone": r.phone,
                    "name": r.name,
                    "district": r.district,
                    "grid": r.grid,
                    "language": r.language,
                    "opted_out": r.opted_out,
                    "opted_out_at": now if r.opted_out else None,
                    "updated_at": now,
                }
                for r in rows
            ]
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.residents.c.phone],
            set_={
                "name": stmt.excluded.name,
                "district": stmt.excluded.district,
                "grid": stmt.excluded.grid,
                "language": stmt.excluded.language,
                "opted_out": stmt.excluded.opted_out,
                "opted_out_at": stmt.excluded.opted_out_at,
                "updated_at": stmt.excluded.updated_at,
            },
        ).returning(t.residents.c.id, t.residents.c.phone)
        with self._write() as conn:
            ids = {phone: rid for rid, phone in conn.execute(stmt)}
            conn.execute(sa.delete(t.resident_segments).where(t.resident_segments.c.resident_id.in_(ids.values())))
            seg_rows = [{"resident_id": ids[r.phone], "segment": s} for r in rows for s in dict.fromkeys(r.segments)]
            if seg_rows:
                conn.execute(sa.insert(t.resident_segments), seg_rows)
        return len(ids)

    def resident_by_phone(self, phone: str) -> Resident | None:
        """The registry's resident with this number (E.164), without segments; None if unknown."""
        r = t.residents
        with self._read() as conn:
            row = conn.execute(
                select(r.c.phone, r.c.name, r.c.district, r.c.grid, r.c.language, r.c.opted_out).where(
                    r.c.phone == phone
                )
            ).first()
        if row is None:
            return None
        return Resident(row.phone, row.name, row.district, row.grid, (), row.language, bool(row.opted_out))

    def set_opted_out(self, phone: str, opted_out: bool = True) -> bool:
        """Record a resident's opt-out (or opt back in); False if the number is not in the registry."""
        with self._write() as conn:
            result = conn.execute(
                sa.update(t.residents)
                .where(t.residents.c.phone == phone)
                .values(opted_out=opted_out, opted_out_at=self.clock() if opted_out else None, updated_at=self.clock())
            )
        return bool(result.rowcount)

    def audience_stats(self) -> dict[str, Any]:
        """Residents by district, by segment and by district x segment (opted-out counted apart)."""
        with self._read() as conn:
            by_district = {
                d: {"residents": int(n), "opted_out": int(o or 0)}
                for d, n, o in conn.execute(
                    select(
                        t.residents.c.district,
                        func.count(),
                        func.sum(sa.case((t.residents.c.opted_out, 1), else_=0)),
                    ).group_by(t.residents.c.district)
                )
            }
            cells: dict[str, dict[str, int]] = defaultdict(dict)
            for d, s, n in conn.execute(
                select(t.residents.c.district, t.resident_segments.c.segment, func.count())
                .select_from(
                    t.residents.join(t.resident_segments, t.resident_segments.c.resident_id == t.residents.c.id)
                )
                .group_by(t.residents.c.district, t.resident_segments.c.segment)
            ):
                cells[d][s] = int(n)
        return {"by_district": by_district, "by_district_segment": dict(cells)}

    # ------------------------------------------------------------------ audience selection

    def _audience_where(self, audience: AudienceFilter) -> list[Any]:
        r = t.residents
        # the segment tests get their own alias of resident_segments and correlate to residents only:
        # a caller that joins resident_segments itself (the matrix by segment) would otherwise see its
        # subquery auto-correlated away to nothing
        rs = t.resident_segments.alias("segment_filter")
        where: list[Any] = [r.c.district.in_(audience.districts)]
        if audience.grids:
            # a listed grid narrows only its own district: the other selected districts are taken whole
            where.append(sa.or_(r.c.district.in_(audience.whole_districts()), r.c.grid.in_(audience.grids)))
        if audience.segments:
            where.append(
                sa.exists().where(rs.c.resident_id == r.c.id, rs.c.segment.in_(audience.segments)).correlate(r)
            )
        if audience.exclude_segments:
            where.append(
                ~sa.exists().where(rs.c.resident_id == r.c.id, rs.c.segment.in_(audience.exclude_segments)).correlate(r)
            )
        return where

    def iter_audience(self, audience: AudienceFilter, chunk: int = 2000) -> Iterator[Any]:
        """Stream the selected residents (id order) without holding them in memory."""
        r = t.residents
        last = 0
        while True:
            # keyset pagination: constant memory and no long-lived cursor holding a read lock
            with self._read() as conn:
                rows = conn.execute(
                    select(r.c.id, r.c.phone, r.c.name, r.c.district, r.c.grid, r.c.opted_out)
                    .where(*self._audience_where(audience), r.c.id > last)
                    .order_by(r.c.id)
                    .limit(chunk)
                ).all()
            if not rows:
                return
            yield from rows
            last = rows[-1].id

    def audience_matrix(self, audience: AudienceFilter) -> dict[str, Any]:
        """Counts of the selection: per district (eligible/opted-out) and per district x segment."""
        r, rs = t.residents, t.resident_segments
        where = self._audience_where(audience)
        with self._read() as conn:
            per_district = {
                d: {"selected": int(n), "opted_out": int(o or 0)}
                for d, n, o in conn.execute(
                    select(r.c.district, func.count(), func.sum(sa.case((r.c.opted_out, 1), else_=0)))
                    .where(*where)
                    .group_by(r.c.district)
                )
            }
            cells: dict[str, dict[str, int]] = defaultdict(dict)
            for d, s, n in conn.execute(
                select(r.c.district, rs.c.segment, func.count())
                .select_from(r.join(rs, rs.c.resident_id == r.c.id))
                .where(*where, r.c.opted_out.is_(False))
                .group_by(r.c.district, rs.c.segment)
            ):
                cells[d][s] = int(n)
            grids: dict[str, dict[str, int]] = defaultdict(dict)
            for d, g, n in conn.execute(
                select(r.c.district, r.c.grid, func.count())
                .where(*where, r.c.opted_out.is_(False))
                .group_by(r.c.district, r.c.grid)
                .order_by(r.c.district, r.c.grid)
            ):
                grids[d][g] = int(n)
        return {"by_district": per_district, "by_district_segment": dict(cells), "by_district_grid": dict(grids)}

    # ------------------------------------------------------------------ runs

    def create_run(
        self, spec: RunSpec, audience: AudienceFilter, *, fence: tuple[str, str, int] | None = None
    ) -> CreatedRun:
        """Snapshot the run and write one delivery row per selected resident, in one transaction.

        Opted-out residents get a ``skipped`` row (reason ``opted_out``) so the log shows
        they were selected and deliberately not messaged.
        """
        now = self.clock()
        r = t.residents
        # numbered in resident-id order (no sort beyond the primary key); opted-out residents take a
        # place in a batch but are written `skipped`, so a batch may carry a few fewer sends
        batch_no = (func.row_number().over(order_by=r.c.id) - 1) // spec.batch_size
        selection = select(
            literal(spec.run_id),
            literal(delivery_key_prefix(spec.run_id)) + r.c.phone,
            r.c.id,
            r.c.phone,
            r.c.district,
            r.c.grid,
            batch_no,
            sa.case((r.c.opted_out, literal(SKIPPED)), else_=literal(PENDING)),
            sa.case((r.c.opted_out, literal("opted_out")), else_=sa.null()),
            literal(0),
            literal(now, sa.DateTime(timezone=True)),
            literal(now, sa.DateTime(timezone=True)),
        ).where(*self._audience_where(audience))
        columns = [
            "run_id", "key", "resident_id", "phone", "district", "grid", "batch_no",
            "state", "reason", "attempts", "created_at", "updated_at",
        ]  # fmt: skip
        try:
            with self._write() as conn, self._fanout_cache(conn):
                if fence is not None and not fence_holds(conn, *fence, is_sqlite=self.is_sqlite):
                    # a scheduler that lost its lease (frozen, then woken) must not fire: checked in the
                    # transaction that creates the run, so no new leader can have fired in between
                    raise LeaseLost(f"scheduler {fence[1]} no longer holds the lease (token {fence[2]})")
                if (
                    spec.approved_by
                    and spec.version_sha256
                    and not still_approved(conn, spec.campaign_id, spec.version_sha256, spec.approved_by)
                ):
                    # an edit voided the approval between the gate's check and this transaction
                    raise UsageError(
                        f"campaign {spec.campaign_id}: the approval of version {spec.version_sha256[:12]} was "
                        "voided while the run was being made; see `dispatch approvals`",
                        field="approval",
                    )
                if not self.is_sqlite:
                    # numbering the selection sorts it; give the sort memory instead of spilling to disk
                    conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
                insert_run(conn, spec, now)
                total, pending, batches, chains, digest = self._write_rows(conn, spec.run_id, columns, selection)
                ledger.open_run(
                    conn,
                    spec.run_id,
                    ledger.Event(
                        kind="run.created", actor=spec.actor, payload=head_payload(spec, total, pending, digest)
                    ),
                    now,
                    chains=chains,
                )
                conn.execute(
                    sa.update(t.runs)
                    .where(t.runs.c.id == spec.run_id)
                    .values(
                        total=total,
                        batches=batches,
                        status="running" if pending else "completed",
                        finished_at=None if pending else now,
                    )
                )
        except IntegrityError as exc:
            detail = str(exc.orig)
            if spec.fire_time is not None and ("uq_runs" in detail or "fire_time" in detail):
                raise DuplicateRun(spec.campaign_id, spec.fire_time) from exc
            raise StoreError(f"cannot create run {spec.run_id}: {exc.orig}") from exc
        if total >= self.ANALYZE_AFTER_ROWS:
            self._analyze_after_fanout()
        return CreatedRun(spec.run_id, total, pending, batches)

    def _write_rows(
        self, conn: Connection, run_id: str, columns: Sequence[str], selection: Any
    ) -> tuple[int, int, int, int, str]:
        """Write a run's delivery rows; returns rows written, pending rows, batches to send, batch
        chains (every batch, skipped rows' included) and the digest of the keys (``keys_digest``).

        PostgreSQL does it in one statement whose aggregates read the rows the INSERT returns, rather
        than reading the run back from the table three times (about 30 ms at 50,000 rows).
        """
        d = t.deliveries
        write = sa.insert(d).from_select(columns, selection)
        rows: Any
        before = None
        if self.is_sqlite:
            # a rowid past the table's largest (SQLite's own numbering): every row after it is this run's,
            # read back in rowid order rather than through the run's index (see keys_digest)
            before = int(conn.execute(select(func.coalesce(func.max(d.c.id), 0))).scalar_one())
            conn.execute(write)
            rows, where, digests = d, [d.c.run_id == run_id], []
        else:
            rows, where = write.returning(d.c.id, d.c.key, d.c.state, d.c.batch_no).cte("written"), []
            digests = [keys_digest_sql(rows)]
        total, pending, last_pending, last, *digested = conn.execute(
            select(
                func.count(),
                func.sum(sa.case((rows.c.state == PENDING, 1), else_=0)),
                func.max(sa.case((rows.c.state == PENDING, rows.c.batch_no), else_=None)),
                func.max(rows.c.batch_no),
                *digests,
            )
            .select_from(rows)
            .where(*where)
        ).one()
        # SQLite hashes the keys here, streaming them (ledger.keys_digest); PostgreSQL hashed them above
        digest = keys_digest(conn, run_id, is_sqlite=True, after_id=before) if self.is_sqlite else digested[0]
        return (
            int(total),
            int(pending or 0),
            0 if last_pending is None else int(last_pending) + 1,
            0 if last is None else int(last) + 1,
            digest or ledger.keys_digest([]),
        )

    #: SQLite's page cache while a run's rows are written (KiB), and its default, given back after
    FANOUT_CACHE_KIB = 8192
    DEFAULT_CACHE = -2000

    @contextlib.contextmanager
    def _fanout_cache(self, conn: Connection) -> Iterator[None]:
        """SQLite: a larger page cache on this connection while a run's rows are written, the default after.

        The run's rows and their four indexes outgrow SQLite's default 2 MB within a few thousand rows, and
        the pages it evicts mid-transaction (dirty: written to the WAL) are read back from there: with 8 MB,
        100,000 rows went in 0.57 s instead of 0.65 s, and 16 or 32 MB were no faster. Given back whether
        the run is made or not, so the pooled connection keeps no more than the default.
        """
        if not self.is_sqlite:
            yield
            return
        conn.exec_driver_sql(f"PRAGMA cache_size = -{self.FANOUT_CACHE_KIB}")
        try:
            yield
        finally:
            with contextlib.suppress(SQLAlchemyError):  # the transaction's own error is the one to report
                conn.exec_driver_sql(f"PRAGMA cache_size = {self.DEFAULT_CACHE}")

    #: a run this large refreshes the planner's statistics (an alert's one-row run never waits for that)
    ANALYZE_AFTER_ROWS = 10_000

    def _analyze_after_fanout(self) -> None:
        """Refresh PostgreSQL's statistics of ``deliveries`` once a run's rows are in.

        Until autovacuum's next analyze, the planner does not know the rows just written, and the
        per-batch queries then chose parallel scans of ``deliveries`` over its indexes: at 300,000
        recipients PostgreSQL spent 0.40 ms of CPU per recipient, 0.17 ms with this
        (``bench/bench_pipeline.py --size 300000``, when the frequency cap still asked by phone).
        Best effort: the run is committed already, and autovacuum will analyze the table anyway.
        Only the columns the workers' queries filter on (claim, the cap, retries, finishing): the
        sample is read either way, but the statistics of every column tripled the time (35 against
        110 ms at 50,000 rows), a sixth of the whole fan-out.
        """
        if self.is_sqlite:
            return
        with contextlib.suppress(StoreError), self._write() as conn:
            conn.exec_driver_sql(f"ANALYZE deliveries ({', '.join(self.ANALYZED_COLUMNS)})")

    #: what the planner must know of a fresh run's rows to keep the workers' queries on their indexes
    ANALYZED_COLUMNS = ("run_id", "batch_no", "state", "resident_id", "sent_at", "claimed_at", "next_attempt_at")

    def get_run(self, run_id: str) -> RunRecord:
        with self._read() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.id == run_id)).mappings().first()
        if row is None:
            raise UsageError(f"no run with id {run_id!r} (see `dispatch runs`)", field="run")
        return _run_record(row)

    def list_runs(self, limit: int = 50, campaign_id: str | None = None) -> list[RunRecord]:
        query = select(t.runs).order_by(t.runs.c.created_at.desc()).limit(limit)
        if campaign_id:
            query = query.where(t.runs.c.campaign_id == campaign_id)
        with self._read() as conn:
            return [_run_record(row) for row in conn.execute(query).mappings()]

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._write() as conn:
            conn.execute(sa.update(t.runs).where(t.runs.c.id == run_id).values(status=status))

    def finish_if_done(self, run_id: str) -> bool:
        """Mark the run completed once no row needs work; True if it is (now) finished."""
        any_open = _any_open(run_id)
        with self._db.read_one() as conn:
            if conn.execute(select(any_open)).scalar_one():
                return False
        with self._write() as conn:
            if conn.execute(select(any_open)).scalar_one():
                return False
            now = self.clock()
            finished = conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status.in_(("running", "creating")))
                .values(status="completed", finished_at=now)
            ).rowcount
            if finished:
                # once per run: the batch chains' tails go on the run's own chain
                ledger.seal_batches(conn, run_id, now)
        return True

    # ------------------------------------------------------------------ worker side

    def pending_batches(self, run_id: str) -> list[int]:
        d = t.deliveries
        with self._read() as conn:
            return [
                int(b)
                for (b,) in conn.execute(
                    select(d.c.batch_no)
                    .where(d.c.run_id == run_id, d.c.state == PENDING)
                    .distinct()
                    .order_by(d.c.batch_no)
                )
            ]

    def claim(self, run_id: str, batch_no: int, worker_id: str) -> list[Claimed]:
        """Atomically lease this batch's due pending rows (``_leases``); rows another worker holds are not
        touched, and a batch another worker's lease holds gives nothing."""
        d = t.deliveries
        token = uuid.uuid4().hex
        now = self.clock()
        with self._write() as conn:
            if not self.is_sqlite:
                # a cancel takes the run row before it materializes the run's leases and cancels what is
                # pending: holding the row shared, a claim is decided wholly before or after it
                status = conn.execute(
                    select(t.runs.c.status).where(t.runs.c.id == run_id).with_for_update(read=True)
                ).scalar_one_or_none()
                if status in ("cancelled", "completed"):
                    return []
            # the batch first, then its rows: taken only once any earlier lease of the batch has ended, and
            # that lease's results commit with its end, so the rows read next are as it left them
            if not leases.take(conn, run_id, batch_no, token, worker_id, now):
                return []
            rows = conn.execute(
                _claimed_select(self.is_sqlite)
                .where(
                    d.c.run_id == run_id,
                    d.c.batch_no == batch_no,
                    d.c.state == PENDING,
                    sa.or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now),
                )
                .order_by(d.c.id)
            ).all()
            if not rows:
                leases.end(conn, token)
                return []
            leases.hold(conn, token, [row.id for row in rows])
            # one event for the whole claim, naming every row it took: a claim is one decision about a batch,
            # and an event per row cost as much again as recording the rows' results
            ledger.append(conn, run_id, [ledger.claim_event([row.id for row in rows], batch_no, worker_id)], now)
        self._prove_alive(worker_id, now)
        return [_claimed(row, now, token) for row in rows]

    #: a claim refreshes its worker's heartbeat at most this often (seconds of the store's clock)
    PROOF_EVERY = 1.0

    def _prove_alive(self, worker_id: str, now: datetime) -> None:
        """A claim proves its worker alive: refresh the heartbeat, at most once a second per worker.

        The heartbeat thread can lag behind (a connection that hung through a network cut recovers
        after fresh ones do); the rows just claimed are safe anyway (``orphans`` wants a claim a whole
        stale window old), but ``resume`` and the watchdog also judge the worker itself by its beat.
        The refresh is its own short transaction after the claim's: inside it, every thread of a worker
        claiming at once queued on the worker's one row while the others wrote their ledger events.
        """
        last = self._proved.get(worker_id)
        if last is not None and abs((now - last).total_seconds()) < self.PROOF_EVERY:
            return
        self._proved[worker_id] = now
        try:
            with self._write_short() as conn:
                conn.execute(sa.update(t.workers).where(t.workers.c.id == worker_id).values(heartbeat_at=now))
        except StoreError:
            # the claim stands: its fresh claimed_at keeps the rows from being taken for orphans, and the
            # heartbeat thread, which logs its own failures, keeps beating
            self._proved.pop(worker_id, None)

    def next_retry_at(self, run_id: str, batch_no: int) -> datetime | None:
        """When the earliest postponed row of this batch becomes due (None if nothing is postponed)."""
        with self._db.read_one() as conn:
            value = conn.execute(_first_retry(run_id, batch_no)).scalar_one()
        return as_utc(value)

    def batch_left(self, run_id: str, batch_no: int) -> tuple[datetime | None, bool]:
        """After a batch: when its earliest postponed row becomes due (``next_retry_at``), and whether
        anything in the run is still open (``finish_if_done``'s first look), in one statement: a worker
        asks both after every batch, and each statement is a round trip and a pooled connection."""
        with self._db.read_one() as conn:
            row = conn.execute(select(_first_retry(run_id, batch_no).scalar_subquery(), _any_open(run_id))).one()
        return as_utc(row[0]), bool(row[1])

    def record(self, outcomes: Sequence[Outcome], actor: str = "worker") -> None:
        """Write a batch's results and its attempts in one transaction.

        Each result is applied only to a row still held under the outcome's claim token. A result
        for a row whose claim was taken away meanwhile (a resume or the watchdog judged the worker
        dead) is never dropped: its attempt is written and the ledger gets a ``delivery.late`` event,
        so every hand-over to a gateway is on record; a late ``sent`` also settles a row that went
        back to ``pending`` and was not claimed again, so it is not sent a second time.

        A gateway as quick as Kannel reports deliveries before the batch has recorded its ids;
        those reports wait in the status backlog, and are applied here once the ids are written,
        rather than when some later report happens to come in.
        """
        if not outcomes:
            return
        self._record(outcomes, actor)
        if any(o.provider_id for o in outcomes):
            self.provider_events.drain_status_backlog()

    def _record(self, outcomes: Sequence[Outcome], actor: str) -> None:
        if any(o.key is None for o in outcomes):
            # a caller that did not carry the keys: read them (a row's key never changes), the ledger
            # names every row by its key
            d = t.deliveries
            with self._read() as conn:
                keys = dict(conn.execute(select(d.c.id, d.c.key).where(d.c.id.in_([o.id for o in outcomes]))).all())
            outcomes = [o if o.key else dataclasses.replace(o, key=keys.get(o.id)) for o in outcomes]
        now = self.clock()
        # what does not depend on what the write finds is built before it begins: on SQLite every other
        # writer waits while one writes, and these took half of a worker's time in the write
        updates = [_record_values(o, now) for o in outcomes]
        events = _result_events(outcomes, actor)
        attempts = [(o, [*_refusal_rows(o, now), _attempt_row(o, now)]) for o in outcomes if o.outcome != "skipped"]
        draft = None
        if self.is_sqlite:
            # hashed against the tails as they are now; taken under the lock only if no one appended since
            with self._read() as conn:
                draft = ledger.draft(conn, events, now)
        with self._write() as conn:
            applied, late = self._apply_outcomes(conn, outcomes, updates, now)
            settled_late = self._late_outcomes(conn, late, now, actor) if late else set()
            if len(applied) < len(outcomes):
                events = _result_events([o for o in outcomes if o.id in applied], actor)
            ledger.append_by_run(conn, events, now, draft=draft)
            late_ids = {o.id for o in late}
            if late_ids or len(applied) < len(outcomes):
                attempts = [
                    (o, rows)
                    for o, rows in attempts
                    if o.id in applied or o.id in settled_late or (o.id in late_ids and _handed_over(o))
                ]
            # providers a failover list tried first and that took nothing come before the one that answered
            insert_rows(conn, t.attempts, [row for _, rows in attempts for row in rows])
            opt_outs = {o.opt_out_phone for o in outcomes if o.opt_out_phone and o.id in applied}
            for phone in opt_outs:
                conn.execute(
                    sa.update(t.residents)
                    .where(t.residents.c.phone == phone)
                    .values(opted_out=True, opted_out_at=now, updated_at=now)
                )

    def _apply_outcomes(
        self, conn: Connection, outcomes: Sequence[Outcome], updates: list[dict[str, Any]], now: datetime
    ) -> tuple[set[int], list[Outcome]]:
        """UPDATE the rows still held under each outcome's claim (``updates``: their new values, in the
        same order); returns the ids applied and the outcomes whose claim was taken away (a row settled
        under the same claim already is a replay)."""
        d = t.deliveries
        leased, updates = self._leased_updates(conn, outcomes, updates, now)
        written = update_where_held(conn, d, leased, self._LEASED_COLUMNS, held_state=PENDING) if leased else 0
        if updates:
            written += self._update_from_values(conn, updates)
        if written == len(outcomes):
            return {o.id for o in outcomes}, []
        # some rows were settled or re-claimed by someone else meanwhile: find which ones we moved
        current = {
            row.id: row
            for row in conn.execute(
                select(d.c.id, d.c.state, d.c.updated_at, d.c.claim_token).where(d.c.id.in_([o.id for o in outcomes]))
            )
        }
        applied = {
            o.id
            for o in outcomes
            if o.id in current
            and current[o.id].state == o.state
            and as_utc(current[o.id].updated_at) == as_utc(now)
            and (o.claim_token is None or current[o.id].claim_token == o.claim_token)
        }
        late = [
            o
            for o in outcomes
            if o.id not in applied
            and o.claim_token is not None
            and o.id in current
            and current[o.id].claim_token != o.claim_token
        ]
        return applied, late

    def _late_outcomes(self, conn: Connection, late: Sequence[Outcome], now: datetime, actor: str) -> set[int]:
        """Results for rows no longer held under their claim; returns the ids they settled."""
        d = t.deliveries
        current = {
            row.id: row
            for row in conn.execute(select(d.c.id, d.c.key, d.c.state).where(d.c.id.in_([o.id for o in late])))
        }
        settled: set[int] = set()
        events: list[tuple[str, ledger.Event]] = []
        # a row another worker's lease holds again is theirs, though it reads pending
        leased = {i for run_id in {o.run_id for o in late} for lease in leases.of_run(conn, run_id) for i in lease.ids}
        for o in late:
            row = current.get(o.id)
            if row is None:
                continue
            if o.state == SENT and row.state == PENDING and o.id not in leased:
                moved = conn.execute(
                    sa.update(d)
                    .where(d.c.id == o.id, d.c.state == PENDING)
                    .values(
                        state=SENT, provider_id=o.provider_id, gateway=o.gateway, parts=o.parts,
                        encoding=o.encoding, body=o.body, reason="late_result", sent_at=now, updated_at=now,
                        next_attempt_at=None, claim_token=None,
                    )
                ).rowcount  # fmt: skip
                if moved:
                    settled.add(o.id)
                    events.append((o.run_id, ledger.Event(
                        "delivery.state", row.key, o.id, PENDING, SENT, provider_id=o.provider_id,
                        reason="late_result", actor=actor,
                    )))  # fmt: skip
                    continue
            if _handed_over(o):
                events.append((o.run_id, ledger.Event(
                    "delivery.late", row.key, o.id, row.state, o.state, provider_id=o.provider_id,
                    error_code=o.error_code, reason="claim_taken", actor=actor,
                )))  # fmt: skip
        ledger.append_by_run(conn, events, now)
        return settled

    _RECORD_COLUMNS = (
        "state", "gateway", "provider_id", "error_code", "error_message", "reason",
        "parts", "encoding", "body", "next_attempt_at", "sent_at", "updated_at",
    )  # fmt: skip

    #: a leased row's result also writes the claim the row was sent under, and counts its attempt
    _LEASED_COLUMNS = (*_RECORD_COLUMNS, "attempts", "claim_token", "claimed_by", "claimed_at")

    def _leased_updates(
        self, conn: Connection, outcomes: Sequence[Outcome], updates: list[dict[str, Any]], now: datetime
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split the new values into rows held by a live lease whose every row has its result here (written
        from ``pending``, and the lease ends) and the rest (written from ``sending``, fenced on the token).

        A lease with rows left over (a batch the gate stopped part way) is materialized first, so those
        rows are released or cancelled from ``sending`` as before. The lease is locked until the results
        commit: a takeover waits, then finds it gone.
        """
        unfenced = {o.id for o in outcomes if o.claim_token is None}
        if unfenced:
            # a result not fenced on a claim (an operator's, a caller's own) applies to a row in flight
            # whoever holds it, as it always did: a lease holding such a row goes to rows in sending first
            for run_id in {o.run_id for o in outcomes if o.claim_token is None}:
                for holding in leases.of_run(conn, run_id, lock=True):
                    if holding.ids & unfenced:
                        leases.materialize(conn, holding, now)
        tokens = {o.claim_token for o in outcomes if o.claim_token is not None}
        if not tokens:
            return [], updates
        live: dict[str, leases.Lease] = {}
        for token in tokens:
            found = leases.held(conn, token, lock=True)
            if found is None:
                continue
            if found.ids <= {o.id for o in outcomes if o.claim_token == token}:
                live[token] = found
                leases.end(conn, token)
            else:
                leases.materialize(conn, found, now)
        if not live:
            return [], updates
        leased, rest = [], []
        for o, values in zip(outcomes, updates, strict=True):
            lease = live.get(o.claim_token) if o.claim_token is not None else None
            if lease is None or o.id not in lease.ids:
                rest.append(values)
                continue
            leased.append(
                {
                    **values, "_token": None, "attempts": o.attempt, "claim_token": lease.token,
                    "claimed_by": lease.claimed_by, "claimed_at": lease.claimed_at,
                }
            )  # fmt: skip
        return leased, rest

    def _update_from_values(self, conn: Connection, updates: list[dict[str, Any]]) -> int:
        """UPDATE the rows still ``sending`` (under the outcome's claim token, when it has one); returns
        how many were updated. One statement over arrays on PostgreSQL (``_bulk``)."""
        return update_where_held(conn, t.deliveries, updates, self._RECORD_COLUMNS, held_state=SENDING)

    def release(self, ids: Sequence[int], token: str | None, actor: str = "worker") -> int:
        """Give claimed rows back to ``pending`` without counting an attempt (paused, stopping, shutting down).

        Only rows still held under ``token`` move: a row someone else took meanwhile stays theirs.
        """
        if not ids:
            return 0
        d = t.deliveries
        with self._write() as conn:
            leases.materialize_held(conn, token, self.clock())
            return transition(
                conn,
                self.clock(),
                ids,
                SENDING,
                PENDING,
                actor=actor,
                reason="released",
                values={"attempts": d.c.attempts - 1, "claim_token": None},
                token=token,
            )

    def still_claimed(self, ids: Sequence[int], token: str | None) -> set[int]:
        """Which of ``ids`` are still held under ``token``, by its lease or as ``sending`` rows (a worker
        checks before handing over)."""
        d = t.deliveries
        if token is None or not ids:
            return set(ids)
        with self._read() as conn:
            lease = leases.held(conn, token)
            if lease is not None:
                return set(ids) & lease.ids
            return {
                i
                for (i,) in conn.execute(
                    select(d.c.id).where(d.c.id.in_(list(ids)), d.c.state == SENDING, d.c.claim_token == token)
                )
            }

    def renew_claim(self, run_id: str, token: str | None) -> set[int] | None:
        """Renew this claim on every row still held under ``token``; returns their ids (None: no token).

        One UPDATE of ``claimed_at``, of the claim's lease while it is live (``_leases``), else of its
        rows in ``sending``: the leader materializes a lease, requeues, settles or marks an orphan only if its
        ``claimed_at`` is still what it read with the orphan list, so for each row either this renewal
        or the leader's move wins, decided by the row itself. A row not in the answer was taken away
        and must not be handed over. Like a claim, a renewal proves the worker alive (its heartbeat
        thread can lag behind after a network cut).
        """
        if token is None:
            return None
        d = t.deliveries
        now = self.clock()
        with self._write() as conn:
            lease = leases.renew(conn, token, now)
            if lease is not None:
                conn.execute(sa.update(t.workers).where(t.workers.c.id == lease.claimed_by).values(heartbeat_at=now))
                return set(lease.ids)
            rows = conn.execute(
                sa.update(d)
                # the (run, state) index bounds the scan to the run's rows in flight
                .where(d.c.run_id == run_id, d.c.state == SENDING, d.c.claim_token == token)
                .values(claimed_at=now)
                .returning(d.c.id, d.c.claimed_by)
            ).all()
            holders = {row.claimed_by for row in rows if row.claimed_by is not None}
            if holders:
                conn.execute(sa.update(t.workers).where(t.workers.c.id.in_(holders)).values(heartbeat_at=now))
        return {row.id for row in rows}

    def live_workers(self, stale_after_seconds: float) -> set[str]:
        """Workers that beat within the window, less those on this host whose process is gone.

        A worker killed on this machine is known dead at once (its pid no longer exists), so a
        ``resume`` right after a crash does not wait for the heartbeat to go stale.
        """
        return self._worker_liveness(stale_after_seconds)[0]

    def _worker_liveness(self, stale_after_seconds: float) -> tuple[set[str], set[str], set[str]]:
        """(workers that beat within the window and whose process is not known gone,
        workers on this host whose process has exited, every worker registered)."""
        import socket

        w = t.workers
        cutoff = self.clock().timestamp() - stale_after_seconds
        here = socket.gethostname()
        alive: set[str] = set()
        exited: set[str] = set()
        registered: set[str] = set()
        with self._read() as conn:
            for wid, host, pid, beat in conn.execute(select(w.c.id, w.c.host, w.c.pid, w.c.heartbeat_at)):
                registered.add(wid)
                if host == here and not _pid_alive(int(pid)):
                    exited.add(wid)
                    continue
                if (as_utc(beat) or datetime.min.replace(tzinfo=UTC)).timestamp() < cutoff:
                    continue
                alive.add(wid)
        return alive, exited, registered

    def orphans(self, run_id: str, stale_after_seconds: float, *, older_than: datetime | None = None) -> list[Claimed]:
        """Rows in ``sending`` whose holder is gone (its process has exited, it is not registered, or
        no recent heartbeat and a claim not renewed within the window either), or, with ``older_than``,
        whose claim was last renewed before that time whoever holds them (a stuck worker).

        Each row carries the ``claimed_at`` read here: every move of an orphan is fenced on it, so a
        row whose worker renews its claim meanwhile (back from a network cut) is left to that worker.
        """
        d = t.deliveries
        alive, exited, registered = self._worker_liveness(stale_after_seconds)
        stale = datetime.fromtimestamp(self.clock().timestamp() - stale_after_seconds, UTC)
        never = datetime.min.replace(tzinfo=UTC)

        def orphaned(holder: str | None, claimed_at: datetime | None) -> bool:
            at = as_utc(claimed_at) or never
            return (
                holder in exited
                or holder not in registered
                or (holder not in alive and at < stale)
                or (older_than is not None and at < older_than)
            )

        with self._read() as conn:
            gone = [lease for lease in leases.of_run(conn, run_id) if orphaned(lease.claimed_by, lease.claimed_at)]
        if gone:
            # their rows become rows in ``sending`` under the same claim, and are judged below as such;
            # a lease renewed since it was read stays its holder's
            with self._write() as conn:
                for lease in gone:
                    leases.materialize(conn, lease, self.clock())
        with self._read() as conn:
            rows = conn.execute(
                _claimed_select(self.is_sqlite, d.c.claimed_by, d.c.claimed_at)
                .where(d.c.run_id == run_id, d.c.state == SENDING)
                .order_by(d.c.id)
            ).all()
        return [_claimed(row, as_utc(row.claimed_at)) for row in rows if orphaned(row.claimed_by, row.claimed_at)]

    def sending_holders(self, run_id: str) -> dict[str, int]:
        """Rows in ``sending`` per worker holding them, leased or not (what ``resume`` reports when it must wait)."""
        d = t.deliveries
        with self._read() as conn:
            holders = {
                str(holder): int(n)
                for holder, n in conn.execute(
                    select(d.c.claimed_by, func.count())
                    .where(d.c.run_id == run_id, d.c.state == SENDING)
                    .group_by(d.c.claimed_by)
                )
            }
            for lease in leases.of_run(conn, run_id):
                holders[lease.claimed_by] = holders.get(lease.claimed_by, 0) + len(lease.ids)
        return holders

    def requeue(self, rows: Sequence[Claimed], actor: str = "resume") -> int:
        """Orphaned rows the gateway never received go back to ``pending`` (attempt already counted).

        Fenced on each row's claim token and ``claimed_at`` as the orphan list read them: a row
        re-claimed since, or whose worker renewed its claim since (it came back and may be handing
        it over), is not touched.
        """
        if not rows:
            return 0
        moved = 0
        with self._write() as conn:
            for (token, seen), ids in _by_claim(rows).items():
                moved += transition(
                    conn, self.clock(), ids, SENDING, PENDING, actor=actor, reason="requeued",
                    values={"claim_token": None, "next_attempt_at": None}, token=token,
                    fence=claim_unrenewed(seen),
                )  # fmt: skip
        return moved

    def operator_settle(
        self, run_id: str, to_state: str, *, reason: str, actor: str, keys: Sequence[str] | None = None
    ) -> int:
        """An operator's verdict on rows in ``unknown`` (the provider could not say whether it sent them).

        ``sent`` or ``failed`` close them; ``pending`` sends them again. Only ``unknown`` rows move, and
        each move is a ledger event carrying the operator and the reason.
        """
        d = t.deliveries
        query = select(d.c.id).where(d.c.run_id == run_id, d.c.state == UNKNOWN).order_by(d.c.id)
        if keys is not None:
            query = query.where(d.c.key.in_(list(keys)))
        # free text from the command line: masked and redacted where it is written, like every other
        reason = scrub(reason)[:64]
        values: dict[str, Any] = {"reason": reason}
        if to_state == PENDING:
            values["next_attempt_at"] = None
        elif to_state == FAILED:
            values["error_code"] = "operator.failed"
        elif to_state == SENT:
            values["sent_at"] = self.clock()
        moved = 0
        with self._write() as conn:
            ids = [i for (i,) in conn.execute(query)]
            for chunk in iter_chunks(ids, 5000):
                moved += transition(
                    conn, self.clock(), chunk, UNKNOWN, to_state, actor=actor, reason=reason, values=values
                )
        return moved

    def cancel_open(self, run_id: str, actor: str = "operator") -> int:
        """End every still-pending row of the run as ``cancelled`` and mark the run cancelled."""
        d = t.deliveries
        n = 0
        with self._write() as conn:
            if not self.is_sqlite:
                # first, as a claim takes it first: a claim is then wholly before this (its lease is
                # materialized below) or after (it sees the run cancelled and takes nothing)
                conn.execute(sa.update(t.runs).where(t.runs.c.id == run_id).values(status="cancelled"))
            # leased rows go to ``sending`` under their claims: their workers stop at the next chunk and
            # cancel what they had not handed over, as they always did
            leases.materialize_run(conn, run_id, self.clock())
            ids = [
                i
                for (i,) in conn.execute(
                    select(d.c.id).where(d.c.run_id == run_id, d.c.state == PENDING).order_by(d.c.id)
                )
            ]
            for chunk in iter_chunks(ids, 5000):
                n += transition(
                    conn,
                    self.clock(),
                    chunk,
                    PENDING,
                    CANCELLED,
                    actor=actor,
                    reason="cancelled",
                    values={"reason": "cancelled"},
                )
            conn.execute(sa.update(t.runs).where(t.runs.c.id == run_id).values(status="cancelled"))
            ledger.seal_batches(conn, run_id, self.clock(), actor=actor)
        return n

    def heartbeat(self, worker_id: str, host: str, pid: int) -> None:
        now = self.clock()
        insert = self._insert()
        stmt = insert(t.workers).values(id=worker_id, host=host, pid=pid, started_at=now, heartbeat_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[t.workers.c.id], set_={"heartbeat_at": now})
        # a beat waits only briefly for the write lock: a missed beat is harmless, a blocked start is not
        with self._write_short() as conn:
            conn.execute(stmt)

    def forget_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(sa.delete(t.workers).where(t.workers.c.id == worker_id))

    # ------------------------------------------------------------------ reading the log

    def counts(self, run_id: str) -> dict[str, int]:
        """Rows per state; a live lease's rows (``pending`` in the table) count as ``sending``."""
        d = t.deliveries
        with self._read() as conn:
            counts = {
                state: int(n)
                for state, n in conn.execute(
                    select(d.c.state, func.count()).where(d.c.run_id == run_id).group_by(d.c.state)
                )
            }
            # read after the counts: a lease taken in between moves rows counted pending (as it should), one
            # ended in between leaves its rows counted pending for this once, never below zero
            return leases.as_sending(counts, leases.in_flight(leases.of_run(conn, run_id)))

    def by_district(self, run_id: str) -> dict[str, dict[str, int]]:
        d = t.deliveries
        out: dict[str, dict[str, int]] = defaultdict(dict)
        with self._read() as conn:
            for district, state, n in conn.execute(
                select(d.c.district, d.c.state, func.count())
                .where(d.c.run_id == run_id)
                .group_by(d.c.district, d.c.state)
            ):
                out[district][state] = int(n)
            held = sorted(i for lease in leases.of_run(conn, run_id) for i in lease.ids)
            for start in range(0, len(held), 5000):
                for district, n in conn.execute(
                    select(d.c.district, func.count())
                    .where(d.c.id.in_(held[start : start + 5000]), d.c.state == PENDING)
                    .group_by(d.c.district)
                ):
                    out[district] = leases.as_sending(out[district], int(n))
        return dict(out)

    def parts_sent(self, run_id: str) -> int:
        d = t.deliveries
        with self._read() as conn:
            value = conn.execute(
                select(func.coalesce(func.sum(d.c.parts), 0)).where(
                    d.c.run_id == run_id, d.c.state.in_(HANDED_OVER_STATES)
                )
            ).scalar_one()
        return int(value)

    def by_gateway(self, run_id: str) -> dict[str, Any]:
        """Which provider took what, and how often one was passed over for the next (failover).

        ``messages``: rows handed over (or left ``unknown``) per provider; ``refused``: attempts a
        provider proved it did not take (or was passed over, its circuit open), per provider and
        code; ``failed_over``: messages that went out through a provider other than the first tried.
        """
        d, a = t.deliveries, t.attempts
        with self._read() as conn:
            messages = {
                str(gateway): int(n)
                for gateway, n in conn.execute(
                    select(d.c.gateway, func.count())
                    .where(d.c.run_id == run_id, d.c.state.in_((*HANDED_OVER_STATES, UNKNOWN)))
                    .group_by(d.c.gateway)
                )
            }
            refused: dict[str, dict[str, int]] = {}
            for gateway, code, n in conn.execute(
                select(a.c.gateway, a.c.error_code, func.count())
                .where(a.c.run_id == run_id, a.c.outcome == "refused")
                .group_by(a.c.gateway, a.c.error_code)
            ):
                refused.setdefault(str(gateway), {})[str(code)] = int(n)
            failed_over = conn.execute(
                select(func.count(func.distinct(d.c.id))).where(
                    d.c.run_id == run_id,
                    d.c.state.in_((*HANDED_OVER_STATES, UNKNOWN)),
                    d.c.id.in_(select(a.c.delivery_id).where(a.c.run_id == run_id, a.c.outcome == "refused")),
                )
            ).scalar_one()
        return {"messages": messages, "refused": refused, "failed_over": int(failed_over)}

    def deliveries(self, run_id: str, chunk: int = 5000) -> Iterator[DeliveryRow]:
        """Stream a run's delivery rows in id order."""
        d = t.deliveries
        last = 0
        while True:
            with self._read() as conn:
                rows = (
                    conn.execute(select(d).where(d.c.run_id == run_id, d.c.id > last).order_by(d.c.id).limit(chunk))
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for row in rows:
                yield delivery_row(row)
            last = rows[-1]["id"]

    def attempts_for(self, delivery_id: int) -> list[AttemptRow]:
        """A delivery's hand-overs to gateways, oldest first."""
        a = t.attempts
        with self._read() as conn:
            rows = conn.execute(select(a).where(a.c.delivery_id == delivery_id).order_by(a.c.id)).mappings().all()
        return [attempt_row(row) for row in rows]

    def drop_all(self) -> None:
        """Remove every table (tests only)."""
        with self._write() as conn:
            t.metadata.drop_all(conn)


def _events_unique_per_chain(conn: Connection) -> None:
    """Drop events' (run_id, seq) uniqueness (version 10: each batch chain of a run counts from 0).

    PostgreSQL drops the constraint. SQLite cannot drop a constraint written into its CREATE TABLE, so
    the table is rebuilt: renamed aside, made anew from the schema, filled with every row (ids kept),
    the old one dropped; in the upgrade's transaction, so a failure leaves version 9 as it was.
    """
    if not any(c.get("name") == "uq_events_run_seq" for c in sa.inspect(conn).get_unique_constraints("events")):
        return  # an upgrade interrupted after this step
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("ALTER TABLE events DROP CONSTRAINT uq_events_run_seq")
        return
    columns = ", ".join(c.name for c in t.events.columns)
    conn.exec_driver_sql("ALTER TABLE events RENAME TO events_v9")
    for index in t.events.indexes:  # index names are per database: the old table's must go first
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
    t.events.create(conn)
    conn.exec_driver_sql(f"INSERT INTO events ({columns}) SELECT {columns} FROM events_v9 ORDER BY id")
    conn.exec_driver_sql("DROP TABLE events_v9")


def _any_open(run_id: str) -> Any:
    """Whether any row of the run still needs work. EXISTS, not COUNT: asked after every batch, and counting
    a 200,000-row run each time is quadratic."""
    d = t.deliveries
    return sa.exists().where(d.c.run_id == run_id, d.c.state.in_(OPEN_STATES))


def _first_retry(run_id: str, batch_no: int) -> Any:
    """When the earliest postponed row of a batch becomes due (NULL if none is)."""
    d = t.deliveries
    return select(func.min(d.c.next_attempt_at)).where(
        d.c.run_id == run_id, d.c.batch_no == batch_no, d.c.state == PENDING
    )


def _claimed_select(is_sqlite: bool, *more: Any) -> Any:
    """What a worker needs of a claimed row to render and send it (then ``more`` columns): the row with its
    resident's name and opt-out. A row of a run made from a list (an alert's number) may have no resident:
    it gets an empty name and is not opted out.

    On PostgreSQL the resident is looked up per row by its primary key. As an outer join, the planner
    hashed the whole ``residents`` table for every batch (its cost model prices 500 index lookups above
    one sequential scan): 14 ms for a batch of 500 at 100,000 residents, against 1.2 ms this way, and
    growing with the registry. SQLite's planner looks the join up by key anyway, and there the two
    lookups per row cost more (1.5–1.6 against 1.2 ms a batch).
    """
    d, r = t.deliveries, t.residents
    source: Any
    if is_sqlite:
        name, opted_out, source = r.c.name, r.c.opted_out, d.outerjoin(r, r.c.id == d.c.resident_id)
    else:

        def resident(column: Any) -> Any:
            return select(column).where(r.c.id == d.c.resident_id).scalar_subquery()

        name, opted_out, source = resident(r.c.name), resident(r.c.opted_out), d
    return select(
        d.c.id, d.c.key, d.c.run_id, d.c.phone, func.coalesce(name, "").label("name"), d.c.district,
        d.c.grid, d.c.attempts, func.coalesce(opted_out, sa.false()).label("opted_out"),
        d.c.claim_token, d.c.batch_no, d.c.resident_id, *more,
    ).select_from(source)  # fmt: skip


def _by_claim(rows: Sequence[Claimed]) -> dict[tuple[str | None, datetime | None], list[int]]:
    """Row ids grouped by (claim token, claimed_at) as read: one fenced UPDATE per group."""
    groups: dict[tuple[str | None, datetime | None], list[int]] = defaultdict(list)
    for row in rows:
        groups[(row.claim_token, row.claimed_at)].append(row.id)
    return groups


def claim_unrenewed(seen: datetime | None) -> list[Any]:
    """The condition that a row's claim was not renewed since ``claimed_at`` was read as ``seen``."""
    d = t.deliveries
    return [d.c.claimed_at.is_(None) if seen is None else d.c.claimed_at == seen]


def _claimed(row: Any, claimed_at: datetime | None, lease: str | None = None) -> Claimed:
    """A ``Claimed`` from a row selected by ``_claimed_select`` (optionally followed by more columns);
    with ``lease`` (its token), a row just leased: the lease left it as it was, so the claim's token and
    its attempt (counted when the result is written) are the row's as they will be.

    By position: a claim builds one per recipient, and reading a Row's 12 fields by name cost about as
    much as the rest of building it.
    """
    id_, key, run_id, phone, name, district, grid, attempts, opted_out, token, batch, resident_id = row[:12]
    if lease is not None:
        token, attempts = lease, attempts + 1
    return Claimed(
        id_, key, run_id, phone, name, district, grid, attempts, bool(opted_out), claimed_at, token, batch, resident_id
    )


_RUN_TIMES = ("fire_time", "as_of", "send_by", "created_at", "finished_at", "approved_at")


def _run_record(row: Any) -> RunRecord:
    values = dict(row)
    for key in _RUN_TIMES:
        values[key] = as_utc(values[key])
    return RunRecord(**values)


def _lock_base(url: str) -> str | None:
    """The SQLite file operator locks sit beside; None for PostgreSQL (advisory locks) or an in-memory log."""
    path = url.split("///", 1)[-1] if "///" in url else ""
    if not path or path == ":memory:":
        return None
    return path


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported as the scheme only
        return url.split(":", 1)[0] + "://…"


_one_line = one_line


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_GATEWAY_OUTCOMES = ("sent", "unknown", "retry", "failed", "expired", "found")


def _handed_over(o: Outcome) -> bool:
    """Whether the outcome is the gateway's answer to a hand-over (not a decision made without one)."""
    return o.outcome in _GATEWAY_OUTCOMES and (o.state != FAILED or o.error_code not in _NO_HANDOVER_CODES)


#: failures decided before anything reached a gateway
_NO_HANDOVER_CODES = ("template.render", "render_error")


def _record_values(o: Outcome, now: datetime) -> dict[str, Any]:
    """A result's new values for its delivery row (``_id``, ``_token``: which row, under which claim)."""
    return {
        "_id": o.id,
        "_token": o.claim_token,
        "state": o.state,
        "gateway": o.gateway,
        "provider_id": o.provider_id,
        "error_code": o.error_code,
        "error_message": scrub_optional(o.error_message),
        "reason": scrub_optional(o.reason),
        "parts": o.parts,
        "encoding": o.encoding,
        "body": o.body,
        "next_attempt_at": o.next_attempt_at,
        "sent_at": now if o.state == "sent" else None,
        "updated_at": now,
    }


def _result_events(outcomes: Sequence[Outcome], actor: str) -> list[tuple[str, ledger.Event]]:
    """The ledger events of results applied to rows their claims held (``sending`` -> each result's state):
    one ``batch.recorded`` event per batch the results belong to, or, from a caller that did not carry
    each row's batch, one ``delivery.state`` event per row."""
    by_batch: dict[tuple[str, int], list[tuple[int, str, str | None, str | None, str | None]]] = {}
    for o in outcomes:
        if o.batch is None:
            return [(o.run_id, _state_event(o, actor)) for o in outcomes]
        by_batch.setdefault((o.run_id, o.batch), []).append(
            (o.id, o.state, o.provider_id, o.error_code, _event_reason(o))
        )
    return [(run_id, ledger.record_event(rows, batch, actor)) for (run_id, batch), rows in by_batch.items()]


def _event_reason(o: Outcome) -> str | None:
    return o.reason or (o.outcome if o.outcome == "retry" else None)


def _state_event(o: Outcome, actor: str) -> ledger.Event:
    """The ledger event of one result applied to a row its claim held (``sending`` -> the result's state)."""
    return ledger.Event(
        "delivery.state",
        o.key,
        o.id,
        SENDING,
        o.state,
        provider_id=o.provider_id,
        error_code=o.error_code,
        reason=_event_reason(o),
        actor=actor,
        batch=o.batch,
    )


def _attempt_row(o: Outcome, now: datetime) -> dict[str, Any]:
    return {
        "delivery_id": o.id,
        "run_id": o.run_id,
        "attempt": o.attempt,
        "gateway": o.gateway,
        "outcome": o.outcome,
        "provider_id": o.provider_id,
        "error_code": o.error_code,
        "error_message": scrub_optional(o.error_message),
        # adapters redact their own traces; this pass catches what they could not know about
        "trace": scrub(json.dumps(o.trace, ensure_ascii=False)) if o.trace else None,
        "at": now,
    }


def _refusal_rows(o: Outcome, now: datetime) -> list[dict[str, Any]]:
    """One ``refused`` attempt per provider that proved it did not take the message (failover)."""
    if not o.refusals:  # nearly every result: no list comprehension to set up for nothing
        return []
    return [
        {
            "delivery_id": o.id,
            "run_id": o.run_id,
            "attempt": o.attempt,
            "gateway": str(r.get("gateway") or "")[:32],
            "outcome": "refused",
            "provider_id": None,
            "error_code": (str(r.get("error_code") or "") or None),
            "error_message": scrub_optional(r.get("error_message")),
            "trace": scrub(json.dumps(r["trace"], ensure_ascii=False)) if r.get("trace") else None,
            "at": now,
        }
        for r in o.refusals
    ]


def open_store(
    url: str,
    *,
    clock: Clock = utcnow,
    migrate: bool = True,
    reporter_gateways: Mapping[str, tuple[str, ...]] | None = None,
) -> SqlStore:
    """The delivery log at ``url``, migrated; ``reporter_gateways`` (actor -> gateway names) limits
    whose rows each provider's delivery reports may move."""
    store = SqlStore(url, clock=clock, reporter_gateways=reporter_gateways)
    if migrate:
        store.migrate()
    return store


def iter_chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
