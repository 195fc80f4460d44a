"""The connection plumbing every operation group shares: reads, writes, short writes, the dialect's INSERT.

Private to ``dispatcher.store``: operation groups (``_reports``, ``_audit``, ``_accounts``...) each
hold one ``Db`` instead of reaching into ``SqlStore``'s internals, and nothing outside the package
sees a connection.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from ..errors import StoreError


def advisory_key(name: str) -> int:
    """The PostgreSQL advisory lock key for ``name``: a signed 64-bit integer from its sha256, the same
    in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def one_line(exc: BaseException) -> str:
    """A driver's message on one line (psycopg's span several): the operator gets one line."""
    return " ".join(str(exc).split())


class WriterTurns:
    """Hands SQLite's one write lock from writer to writer at once, across threads and processes.

    A writer that finds the database locked is put to sleep by SQLite's busy handler in growing steps
    (1, 2, 5 ... 100 ms), so under contention the lock lies idle most of the time: two workers of four
    threads each recorded 1,300 rows/s where the writes alone take a fifth of that time. Writers here
    first take their turn: a lock per process, then an advisory ``flock`` on ``<database>.writers``
    polled every half millisecond. The turn only orders writers; SQLite's own lock still guarantees
    correctness, so a writer whose turn does not come within ``wait`` seconds (a frozen process holding
    it) goes ahead and falls back to SQLite's busy handler.
    """

    POLL = 0.0005

    def __init__(self, path: str) -> None:
        self._path = f"{path}.writers"
        self._local = threading.local()
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own description
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def turn(self, wait: float) -> Iterator[None]:
        if getattr(self._local, "held", False):
            yield  # already this thread's turn (a write inside a write's scope)
            return
        deadline = time.monotonic() + wait
        if not self._thread_lock.acquire(timeout=wait):
            yield
            return
        locked = False
        try:
            try:
                fd = self._file()
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        locked = True
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            break
                        time.sleep(self.POLL)
            except OSError:
                pass  # no turn file (read-only folder): SQLite's busy handler alone orders writers
            self._local.held = True
            yield
        finally:
            self._local.held = False
            if locked and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._thread_lock.release()


#: SQLite: how many pages a connection lets its write-ahead log grow to before its own commit copies them into
#: the database file (SQLite's default is 1,000). Writers that go through ``Db`` checkpoint long before
#: this, after their turn (``CHECKPOINT_EVERY``); the limit is only the net for a process that writes
#: otherwise, so that its log cannot grow without bound
WAL_AUTOCHECKPOINT = 10_000

#: SQLite: every this many writes through one ``Db``, the writer copies the log into the database file
#: (a passive checkpoint) once its turn is over. Left to SQLite, the checkpoint ran inside the commit of
#: whichever writer crossed 1,000 pages of log: a fifth of the time a worker held the one write lock went
#: on it (a 500-recipient batch writes about 540 pages, most of them leaves of the random-ordered provider
#: id index), and every other writer waited meanwhile. Outside the turn it overlaps with the next writer's
#: work. Every 8 writes is every 4 batches or so of one worker: the log stays a few MB
CHECKPOINT_EVERY = 8


class Db:
    """An engine with the store's three ways in; ``clock`` is read on every call so a swapped clock counts."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self._clock = clock
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._writer = engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        self._short_writer = engine.execution_options(sqlite_begin="BEGIN IMMEDIATE", sqlite_busy_ms=2000)
        path = engine.url.database if self.is_sqlite else None
        self._turns = WriterTurns(path) if path and path != ":memory:" else None
        self._writes = itertools.count(1)
        # PostgreSQL: a lone statement outside any transaction (see ``read_one``)
        self._lone = engine if self.is_sqlite else engine.execution_options(isolation_level="AUTOCOMMIT")

    def _turn(self, wait: float) -> Any:
        return self._turns.turn(wait) if self._turns is not None else nullcontext()

    def now(self) -> datetime:
        return self._clock()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        try:
            with self._turn(60.0), self._writer.begin() as conn:
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"delivery log write failed: {one_line(exc.orig or exc)}") from exc
        self._wrote()

    @contextmanager
    def write_short(self) -> Iterator[Connection]:
        """A write that gives up after about two seconds of waiting for a lock (leases, fences)."""
        try:
            with self._turn(2.0), self._short_writer.begin() as conn:
                if not self.is_sqlite:
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"delivery log write failed: {one_line(exc.orig or exc)}") from exc
        self._wrote()

    def _wrote(self) -> None:
        """After a committed write, its turn over: every ``CHECKPOINT_EVERY`` writes, checkpoint SQLite's log."""
        if self._turns is not None and next(self._writes) % CHECKPOINT_EVERY == 0:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Copy what SQLite's write-ahead log holds into the database file, as far as no reader still needs it.

        Passive: it waits for no lock, and writers and readers go on meanwhile. One that fails loses
        nothing (the log keeps the pages, and the next one, or a connection's own at
        ``WAL_AUTOCHECKPOINT`` pages, copies them).
        """
        if not self.is_sqlite:
            return
        try:
            raw = self.engine.raw_connection()
        except sa.exc.SQLAlchemyError:
            return
        try:
            # on the driver's connection, outside SQLAlchemy's transaction: a checkpoint inside one cannot run
            cursor = raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cursor.fetchall()
            cursor.close()
        except sqlite3.Error:
            pass  # the write it follows is committed: never report it as failed for this
        finally:
            raw.close()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"could not read the delivery log: {one_line(exc.orig or exc)}") from exc

    @contextmanager
    def read_one(self) -> Iterator[Connection]:
        """A read of one plain statement, for the reads a worker makes around every batch.

        On PostgreSQL it runs outside any transaction (autocommit): ``read`` wraps a statement in a BEGIN
        and a ROLLBACK, two more round trips that see the same rows, since under READ COMMITTED each
        statement takes its own snapshot either way. Not for several statements that must agree, a
        locking read (``FOR SHARE``) or a stream (a server-side cursor needs a transaction).
        """
        try:
            with self._lone.connect() as conn:
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"could not read the delivery log: {one_line(exc.orig or exc)}") from exc

    def insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
        from sqlalchemy.dialects import postgresql, sqlite

        return sqlite.insert if self.is_sqlite else postgresql.insert
