"""The connection plumbing every operation group shares: reads, writes, short writes, the dialect's INSERT.

Private to ``dispatcher.store``: operation groups (``_reports``, ``_audit``, ``_accounts``...) each
hold one ``Db`` instead of reaching into ``SqlStore``'s internals, and nothing outside the package
sees a connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from ..errors import StoreError


def one_line(exc: BaseException) -> str:
    """A driver's message on one line (psycopg's span several): the operator gets one line."""
    return " ".join(str(exc).split())


class Db:
    """An engine with the store's three ways in; ``clock`` is read on every call so a swapped clock counts."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self._clock = clock
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._writer = engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        self._short_writer = engine.execution_options(sqlite_begin="BEGIN IMMEDIATE", sqlite_busy_ms=2000)

    def now(self) -> datetime:
        return self._clock()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        try:
            with self._writer.begin() as conn:
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"delivery log write failed: {one_line(exc.orig or exc)}") from exc

    @contextmanager
    def write_short(self) -> Iterator[Connection]:
        """A write that gives up after about two seconds of waiting for a lock (leases, fences)."""
        try:
            with self._short_writer.begin() as conn:
                if not self.is_sqlite:
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"delivery log write failed: {one_line(exc.orig or exc)}") from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except (OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"could not read the delivery log: {one_line(exc.orig or exc)}") from exc

    def insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
        from sqlalchemy.dialects import postgresql, sqlite

        return sqlite.insert if self.is_sqlite else postgresql.insert
