"""Dashboard accounts, their server-side sessions and the login throttle's counters.

``dispatcher.accounts`` owns the rules (names, roles, password hashing, limits); this module
only keeps the rows. A session is stored by the SHA-256 of its id, so a read of the table
does not hand out live cookies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import sqlalchemy as sa

from ..errors import UsageError
from . import schema as t
from ._db import Db


@dataclass(frozen=True)
class StoredAccount:
    name: str
    role: str
    disabled: bool = False


@dataclass(frozen=True)
class Credentials:
    name: str
    role: str
    password_hash: str
    disabled: bool


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def _end_sessions(conn: sa.Connection, name: str) -> int:
    return int(conn.execute(sa.delete(t.sessions).where(t.sessions.c.account == name)).rowcount)


def _require(conn: sa.Connection, name: str) -> None:
    a = t.accounts
    if conn.execute(sa.select(a.c.name).where(a.c.name == name)).first() is None:
        raise UsageError(f"no account named {name!r}", field="name")


class Accounts:
    """Accounts, sessions and login counters; reached as ``store.accounts``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    # ------------------------------------------------------------------ accounts

    def put(
        self, name: str, role: str, password_hash: str, *, replace: bool
    ) -> Literal["created", "replaced", "exists"]:
        """Create an account, or (with ``replace``) reset an existing one's role and password.

        Resetting ends the account's sessions: a new role or password must not ride on a login
        made before it. ``exists``: the account was there and ``replace`` was not given; nothing changed.
        """
        now = self._db.now()
        a = t.accounts
        with self._db.write() as conn:
            exists = conn.execute(sa.select(a.c.name).where(a.c.name == name)).first()
            if exists and not replace:
                return "exists"
            values = {"role": role, "password_hash": password_hash, "updated_at": now}
            if exists:
                conn.execute(sa.update(a).where(a.c.name == name).values(**values))
                _end_sessions(conn, name)
                return "replaced"
            conn.execute(sa.insert(a).values(name=name, created_at=now, **values))
            return "created"

    def credentials(self, name: str) -> Credentials | None:
        a = t.accounts
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(a.c.name, a.c.role, a.c.password_hash, a.c.disabled).where(a.c.name == name)
            ).first()
        return None if row is None else Credentials(row.name, row.role, row.password_hash, bool(row.disabled))

    def get(self, name: str) -> StoredAccount | None:
        """The account if it exists and is enabled."""
        a = t.accounts
        with self._db.read() as conn:
            row = conn.execute(sa.select(a.c.name, a.c.role).where(a.c.name == name, a.c.disabled.is_not(True))).first()
        return StoredAccount(row.name, row.role) if row else None

    def all_accounts(self) -> list[StoredAccount]:
        a = t.accounts
        with self._db.read() as conn:
            return [
                StoredAccount(n, r, bool(d))
                for n, r, d in conn.execute(sa.select(a.c.name, a.c.role, a.c.disabled).order_by(a.c.name))
            ]

    def set_password_hash(self, name: str, password_hash: str) -> int:
        """A new password for ``name``; every session of the account ends. Returns how many ended."""
        a = t.accounts
        with self._db.write() as conn:
            _require(conn, name)
            conn.execute(
                sa.update(a).where(a.c.name == name).values(password_hash=password_hash, updated_at=self._db.now())
            )
            return _end_sessions(conn, name)

    def set_disabled(self, name: str, disabled: bool = True) -> int:
        """Disable (or enable again); disabling ends the sessions at once. Returns how many ended."""
        a = t.accounts
        with self._db.write() as conn:
            _require(conn, name)
            conn.execute(sa.update(a).where(a.c.name == name).values(disabled=disabled, updated_at=self._db.now()))
            return _end_sessions(conn, name) if disabled else 0

    def remove(self, name: str) -> int:
        """Delete an account and end its sessions. Returns how many sessions ended."""
        a = t.accounts
        with self._db.write() as conn:
            _require(conn, name)
            conn.execute(sa.delete(a).where(a.c.name == name))
            return _end_sessions(conn, name)

    # ------------------------------------------------------------------ sessions

    def start_session(self, session_id: str, account: StoredAccount, max_age: int) -> None:
        """Keep a new session (expired ones are dropped on the way)."""
        now = self._db.now()
        s = t.sessions
        with self._db.write() as conn:
            conn.execute(sa.delete(s).where(s.c.expires_at < now))
            conn.execute(
                sa.insert(s).values(
                    id_hash=_id_hash(session_id),
                    account=account.name,
                    role=account.role,
                    created_at=now,
                    expires_at=now + timedelta(seconds=max_age),
                )
            )

    def session_account(self, session_id: str) -> StoredAccount | None:
        """The account of a live session: unexpired, account present and enabled, role unchanged since login."""
        s, a = t.sessions, t.accounts
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(a.c.name, a.c.role)
                .select_from(s.join(a, a.c.name == s.c.account))
                .where(
                    s.c.id_hash == _id_hash(session_id),
                    s.c.expires_at > self._db.now(),
                    a.c.disabled.is_not(True),
                    a.c.role == s.c.role,
                )
            ).first()
        return StoredAccount(row.name, row.role) if row else None

    def end_session(self, session_id: str) -> None:
        with self._db.write() as conn:
            conn.execute(sa.delete(t.sessions).where(t.sessions.c.id_hash == _id_hash(session_id)))

    # ------------------------------------------------------------------ login throttle

    def count_attempt(self, name_key: str, address_key: str, *, name_limit: int, window: int) -> tuple[int, int]:
        """Count one login attempt against both keys, committed before any password is checked.

        Each count is one atomic upsert, so parallel guesses cannot all pass a check made before
        any of them is counted. The address is not counted when the name is over ``name_limit``
        (an attempt already refused costs nothing); its count is then 0. Counters of windows
        long past are dropped on the way, so names tried once do not pile up for ever.
        """
        now = self._db.now()
        lt = t.login_throttle
        with self._db.write() as conn:
            conn.execute(sa.delete(lt).where(lt.c.window_start < now - timedelta(seconds=2 * window)))
            by_name = self._count(conn, name_key, now, window)
            by_address = self._count(conn, address_key, now, window) if by_name <= name_limit else 0
        return by_name, by_address

    def forgive(self, name_key: str, address_key: str) -> None:
        """After a successful login: forget the name's failures, give the address its attempt back."""
        lt = t.login_throttle
        with self._db.write() as conn:
            conn.execute(sa.delete(lt).where(lt.c.key == name_key))
            conn.execute(sa.update(lt).where(lt.c.key == address_key, lt.c.count > 0).values(count=lt.c.count - 1))

    def _count(self, conn: sa.Connection, key: str, now: datetime, window: int) -> int:
        lt = t.login_throttle
        stale = lt.c.window_start < now - timedelta(seconds=window)
        stmt = self._db.insert()(lt).values(key=key, window_start=now, count=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=[lt.c.key],
            set_={
                "count": sa.case((stale, 1), else_=lt.c.count + 1),
                "window_start": sa.case((stale, now), else_=lt.c.window_start),
            },
        ).returning(lt.c.count)
        return int(conn.execute(stmt).scalar_one())
