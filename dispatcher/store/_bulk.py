"""Writing many rows at once on the send path, without SQLAlchemy's per-row work.

Every recipient a worker sends costs a ledger event, an attempt row and an UPDATE of its delivery
row. Through ``conn.execute(stmt, rows)`` SQLAlchemy builds a parameter dict per row and processes
each value (``construct_params``): about a third of a worker's CPU per recipient went there. Here the
statement is compiled once per table and columns, and the rows go to the driver as tuples:

- PostgreSQL: a batch's INSERT and its record UPDATE as one statement each over ``unnest`` of one array
  per column whose values differ from row to row, each array sent as its text form (``_array``), with
  the values every row shares as plain parameters; what has no text form here goes by ``COPY``.
- SQLite: the driver's ``executemany`` with the same value conversions SQLAlchemy would apply
  (its datetime format), so rows written here read back exactly like rows written through it.

Both run inside the caller's transaction on the caller's connection: nothing changes about
atomicity, only the cost of getting rows to the database.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from operator import itemgetter
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
        if len(rows) >= UNNEST_FROM and _postgres_insert_unnest(conn, table, rows, columns):
            return
        names = ", ".join(_quoted(conn.dialect, c) for c in columns)
        statement = f"COPY {_quoted(conn.dialect, table.name)} ({names}) FROM STDIN"
        values = _values_of(columns)
        with _driver_cursor(conn, statement) as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(values(row))
        return
    converters = _sqlite_converters(conn.dialect, table, columns)
    conn.exec_driver_sql(_sqlite_insert(conn.dialect, table, columns), _sqlite_params(rows, columns, converters))


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
        return _postgres_update_held(conn, table, rows, tuple(columns), held_state)
    columns = tuple(columns)
    converters = _sqlite_converters(conn.dialect, table, columns)
    params = _sqlite_params(
        rows, columns, converters, lambda r: (r["_id"], held_state, r["_token"], r["_token"])
    )  # fmt: skip
    return int(conn.exec_driver_sql(_sqlite_update(conn.dialect, table, columns), params).rowcount)


def _values_of(columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A row dict's values in column order, read in C (a generator per row cost 0.9 µs, this 0.2)."""
    if len(columns) == 1:
        (only,) = columns
        return lambda row: (row[only],)
    return itemgetter(*columns)


@contextmanager
def _driver_cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """A cursor of the driver's own, for ``COPY``; its errors are raised as SQLAlchemy raises the driver's.

    SQLAlchemy wraps what the driver raises in the statements it runs, and the store's transactions
    turn those (the database gone, a lost connection) into ``StoreError``, which callers retry or
    spool. A ``COPY`` bypasses SQLAlchemy, so the same wrapping happens here: a connection lost
    mid-``COPY`` is an outage like any other, not an unexpected crash of the batch.
    """
    import psycopg  # only PostgreSQL takes this path

    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
    finally:
        cursor.close()


def _quoted(dialect: Dialect, name: str) -> str:
    return str(dialect.identifier_preparer.quote(name))


def _sqlite_params(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    converters: Sequence[Callable[[Any], Any] | None],
    tail: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None,
) -> list[tuple[Any, ...]]:
    """Each row's values in column order, converted as SQLAlchemy would bind them (then ``tail(row)``).

    Only the columns that have a converter are visited, and a value that is the very object the row
    before had in that column is not converted again: a batch's rows share one ``now``, and SQLite's
    datetime format (``strftime`` in Python) cost more than the rest of a row's conversion together.
    """
    values = _values_of(tuple(columns))
    slots = [(i, conv) for i, conv in enumerate(converters) if conv is not None]
    seen: list[Any] = [_NOTHING] * len(columns)
    made: list[Any] = [None] * len(columns)
    params = []
    for row in rows:
        row_values = list(values(row))
        for i, conv in slots:
            value = row_values[i]
            if value is None:
                continue
            if value is seen[i]:
                row_values[i] = made[i]
            else:
                seen[i] = value
                row_values[i] = made[i] = conv(value)
        params.append((*row_values, *tail(row)) if tail is not None else tuple(row_values))
    return params


#: a marker no row value is: the first row of a batch always converts its values
_NOTHING = object()


@lru_cache(maxsize=64)
def _sqlite_converters(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in columns)


@lru_cache(maxsize=64)
def _sqlite_insert(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> str:
    """The INSERT of one row, run once per row (``executemany``). One INSERT of the batch's rows
    (``VALUES (...), (...)``) cost a little less CPU, but SQLite keeps each such statement compiled:
    a worker's peak RSS grew from 100 to 141 MB."""
    names = ", ".join(_quoted(dialect, c) for c in columns)
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {_quoted(dialect, table.name)} ({names}) VALUES ({marks})"


@lru_cache(maxsize=64)
def _sqlite_update(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> str:
    """The UPDATE of one row, run once per row (``executemany``). One ``UPDATE ... FROM (VALUES ...)``
    of the batch's rows cost no less: SQLite materialises the values, then updates in two passes."""
    sets = ", ".join(f"{_quoted(dialect, c)} = ?" for c in columns)
    return (
        f"UPDATE {_quoted(dialect, table.name)} SET {sets} "
        "WHERE id = ? AND state = ? AND (? IS NULL OR claim_token = ?)"
    )


def _postgres_update_held(
    conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], columns: tuple[str, ...], held_state: str
) -> int:
    """One statement updates the rows from ``unnest`` of the new values, one array per column.

    Per row this costs about a third less of PostgreSQL's CPU and of the worker's than a pipelined
    ``executemany`` of one UPDATE per row (13–15 against 19–20 µs on the server, 6.5 against 11 µs in
    the worker, for 500-row batches): one statement is planned and started per batch instead of per
    row. The arrays go as their text form, joined here (psycopg would build each array value by
    value); before, the values went by ``COPY`` into a temporary table the UPDATE then read: two more
    statements and a table written per batch, 6.2 against 5.8 ms a batch of 500 (alternating, 94
    batches each).

    A column whose new value is the same in every row (the batch's time, its gateway, the claim's
    holder; no error in a batch that all went out) is set once, as a parameter of the UPDATE, and
    only the columns that differ from row to row go as arrays: formatting every value of every
    row was a ninth of a worker's CPU per recipient, and most of those values were the same.
    """
    first = rows[0]
    shared = tuple(c for c in columns if _same_in_every_row(rows, c, first[c]))
    varying = tuple(c for c in columns if c not in shared)
    arrays = _arrays(rows, ("_id", "_token", *varying), state=held_state)
    if arrays is None:
        # a delivery row's columns hold text, integers and times: anything else is a caller's mistake
        raise TypeError(f"a new value of {table.name} ({', '.join(varying)}) has no array form")
    params = {**arrays, **{f"shared_{i}": first[c] for i, c in enumerate(shared)}}
    update = _postgres_unnest_update(conn.dialect, table, varying, shared)
    return int(conn.exec_driver_sql(update, params).rowcount)


#: from this many rows, an INSERT goes as one statement over arrays rather than by ``COPY``: 500 attempts
#: cost the worker 0.35 against 0.86 ms of CPU, and the server no more (1.45 against 1.96 ms a batch,
#: round trip included); a few rows (a batch's ledger events) gain nothing
UNNEST_FROM = 16


def _quoted_element(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _boolean_element(value: bool) -> str:
    return "t" if value else "f"


def _datetime_element(value: datetime) -> str:
    return '"' + value.isoformat() + '"'


#: the text form of an array element, by the value's exact type; a value of any other type has none here
#: (the caller then writes its rows by ``COPY``). Floats are left out: their text form is not one
#: PostgreSQL reads back to the same value in every case
_ELEMENT: dict[type, Callable[[Any], str]] = {
    int: str,
    str: _quoted_element,
    bool: _boolean_element,
    datetime: _datetime_element,
}


def _array(values: Iterable[Any]) -> str | None:
    """PostgreSQL's text form of a one-dimensional array of ``values``, or None if one has no text form
    here. Inside double quotes only a backslash and a double quote are special; NULL is unquoted."""
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
            continue
        element = _ELEMENT.get(type(value))
        if element is None:
            return None
        parts.append(element(value))
    return "{" + ",".join(parts) + "}"


def _arrays(rows: Sequence[dict[str, Any]], columns: Sequence[str], **constant: str) -> dict[str, str] | None:
    """Parameters ``array_0``, ... (one array per column, in order) and ``array_<name>`` (each ``constant``
    repeated for every row); None if a value has no text form here."""
    params = {}
    for i, column in enumerate(columns):
        text = _array([r[column] for r in rows])
        if text is None:
            return None
        params[f"array_{i}"] = text
    for name, value in constant.items():
        params[f"array_{name}"] = "{" + ",".join([_quoted_element(value)] * len(rows)) + "}"
    return params


def _postgres_insert_unnest(
    conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], columns: tuple[str, ...]
) -> bool:
    """INSERT ``rows`` as one statement over arrays of the columns that differ from row to row, the others
    as parameters; False (nothing written) if a value has no text form here."""
    first = rows[0]
    shared = tuple(c for c in columns if _same_in_every_row(rows, c, first[c]))
    varying = tuple(c for c in columns if c not in shared)
    arrays = _arrays(rows, varying) if varying else None
    if arrays is None:
        return False
    params = {**arrays, **{f"shared_{i}": first[c] for i, c in enumerate(shared)}}
    conn.exec_driver_sql(_postgres_unnest_insert(conn.dialect, table, varying, shared), params)
    return True


def _typed(dialect: Dialect, table: sa.Table, column: str) -> str:
    """The column's type as a cast names it: without its collation (``Key``'s "C"), which a cast to an
    array type cannot carry and the column applies to what is stored in it anyway."""
    return _COLLATION.sub("", str(table.c[column].type.compile(dialect)))


_COLLATION = re.compile(r' COLLATE "[^"]*"')


def _unnest(dialect: Dialect, table: sa.Table, columns: Sequence[str]) -> str:
    """``unnest`` of the arrays ``array_0``, ... (``table``'s ``columns``, typed as they are) as the rows
    ``v``, whose columns keep the table's names."""
    arrays = ", ".join(f"CAST(%(array_{i})s AS {_typed(dialect, table, c)}[])" for i, c in enumerate(columns))
    return f"unnest({arrays}) AS v({', '.join(_quoted(dialect, c) for c in columns)})"


@lru_cache(maxsize=128)
def _postgres_unnest_insert(
    dialect: Dialect, table: sa.Table, varying: tuple[str, ...], shared: tuple[str, ...]
) -> str:
    names = ", ".join(_quoted(dialect, c) for c in (*varying, *shared))
    values = [f"v.{_quoted(dialect, c)}" for c in varying]
    # a parameter is cast to its column's type: psycopg sends a Python str untyped, None as NULL
    values += [f"CAST(%(shared_{i})s AS {_typed(dialect, table, c)})" for i, c in enumerate(shared)]
    return (
        f"INSERT INTO {_quoted(dialect, table.name)} ({names}) "
        f"SELECT {', '.join(values)} FROM {_unnest(dialect, table, varying)}"
    )


@lru_cache(maxsize=128)
def _postgres_unnest_update(
    dialect: Dialect, table: sa.Table, varying: tuple[str, ...], shared: tuple[str, ...]
) -> str:
    """The record UPDATE from arrays: ``array_0`` the ids, ``array_1`` the claim tokens, then ``varying``;
    ``array_state`` the held state, repeated for every row.

    The held state is compared with a column of the new values, not with a constant: just after a fan-out
    the statistics know no row in it, and against a constant the planner then scanned the (run, state,
    batch) index for it with the new values as the inner side of a nested loop (500 x 500 comparisons a
    batch: PostgreSQL's CPU per recipient quadrupled in `make bench`). Compared as a join condition, it
    looks each row up by its primary key.
    """
    id_type = _typed(dialect, table, "id")
    arrays = [f"CAST(%(array_0)s AS {id_type}[])", "CAST(%(array_1)s AS text[])"]
    arrays += [f"CAST(%(array_{i + 2})s AS {_typed(dialect, table, c)}[])" for i, c in enumerate(varying)]
    arrays.append("CAST(%(array_state)s AS text[])")
    names = ["_id", "_token", *(_quoted(dialect, c) for c in varying), "_state"]
    sets = [f"{_quoted(dialect, c)} = v.{_quoted(dialect, c)}" for c in varying]
    sets += [
        f"{_quoted(dialect, c)} = CAST(%(shared_{i})s AS {_typed(dialect, table, c)})" for i, c in enumerate(shared)
    ]
    return (
        f"UPDATE {_quoted(dialect, table.name)} AS t SET {', '.join(sets)} "
        f"FROM unnest({', '.join(arrays)}) AS v({', '.join(names)}) "
        "WHERE t.id = v._id AND t.state = v._state AND (v._token IS NULL OR t.claim_token = v._token)"
    )


def _same_in_every_row(rows: Sequence[dict[str, Any]], column: str, value: Any) -> bool:
    """Whether every row has ``value`` in ``column`` (the very object, as a batch's rows mostly share it,
    or an equal one)."""
    for r in rows:
        other = r[column]
        if other is not value and other != value:
            return False
    return True
