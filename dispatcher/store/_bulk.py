"""Writing many rows at once on the send path, without SQLAlchemy's per-row work.

Every recipient a worker sends costs a ledger event, an attempt row and an UPDATE of its delivery
row. Through ``conn.execute(stmt, rows)`` SQLAlchemy builds a parameter dict per row and processes
each value (``construct_params``): about a third of a worker's CPU per recipient went there. Here the
statement is compiled once per table and columns, and the rows go to the driver as tuples:

- PostgreSQL: INSERTs as one ``COPY ... FROM STDIN`` (psycopg writes the rows in C; the server's bulk
  path skips per-statement overhead), and the record UPDATE as psycopg's pipelined ``executemany``.
- SQLite: the driver's ``executemany`` with the same value conversions SQLAlchemy would apply
  (its datetime format), so rows written here read back exactly like rows written through it.

Both run inside the caller's transaction on the caller's connection: nothing changes about
atomicity, only the cost of getting rows to the database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect


def insert_rows(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys) into ``table`` in the caller's transaction."""
    if not rows:
        return
    first = rows[0].keys()
    columns = tuple(first)
    if any(r.keys() != first for r in rows):
        # rows of different shapes (rare callers): SQLAlchemy fills the gaps with defaults
        conn.execute(sa.insert(table), list(rows))
        return
    if conn.dialect.name == "postgresql":
        names = ", ".join(_quoted(conn.dialect, c) for c in columns)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(f"COPY {_quoted(conn.dialect, table.name)} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(tuple(row[c] for c in columns))
        finally:
            cursor.close()
        return
    sql, converters = _sqlite_insert(conn.dialect, table, columns)
    conn.exec_driver_sql(sql, [_converted(row, columns, converters) for row in rows])


def update_where_held(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    held_state: str,
) -> int:
    """UPDATE ``columns`` of each row (``_id``) still in ``held_state`` and, where the row dict carries
    a ``_token``, still held under that claim token; returns how many rows were updated."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        # psycopg's executemany pipelines the statements and dumps each value in C; one statement
        # over unnest() arrays was slower: psycopg builds array literals in Python
        sql = _postgres_update(conn.dialect, table, tuple(columns))
        params = [(*(r[c] for c in columns), r["_id"], held_state, r["_token"], r["_token"]) for r in rows]
        return int(conn.exec_driver_sql(sql, params).rowcount)
    sql, converters = _sqlite_update(conn.dialect, table, tuple(columns))
    params = [(*_converted(r, columns, converters), r["_id"], held_state, r["_token"], r["_token"]) for r in rows]
    return int(conn.exec_driver_sql(sql, params).rowcount)


def _quoted(dialect: Dialect, name: str) -> str:
    return str(dialect.identifier_preparer.quote(name))


def _converted(row: dict[str, Any], columns: Sequence[str], converters: Sequence[Callable[[Any], Any] | None]) -> tuple:
    return tuple(
        value if conv is None or value is None else conv(value)
        for value, conv in zip((row[c] for c in columns), converters, strict=True)
    )


@lru_cache(maxsize=64)
def _sqlite_converters(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in columns)


@lru_cache(maxsize=64)
def _sqlite_insert(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
    names = ", ".join(_quoted(dialect, c) for c in columns)
    marks = ", ".join("?" for _ in columns)
    return (
        f"INSERT INTO {_quoted(dialect, table.name)} ({names}) VALUES ({marks})",
        _sqlite_converters(dialect, table, columns),
    )


@lru_cache(maxsize=64)
def _sqlite_update(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
    sets = ", ".join(f"{_quoted(dialect, c)} = ?" for c in columns)
    sql = (
        f"UPDATE {_quoted(dialect, table.name)} SET {sets} "
        "WHERE id = ? AND state = ? AND (? IS NULL OR claim_token = ?)"
    )
    return sql, _sqlite_converters(dialect, table, columns)


@lru_cache(maxsize=64)
def _postgres_update(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> str:
    sets = ", ".join(f"{_quoted(dialect, c)} = %s" for c in columns)
    return (
        f"UPDATE {_quoted(dialect, table.name)} SET {sets} "
        "WHERE id = %s AND state = %s AND (%s::text IS NULL OR claim_token = %s)"
    )
