"""Dashboard accounts: a name, a role (``auditor`` or ``operator``) and an scrypt password hash.

There is no default account and no default password: the first account is made
with ``dispatch users add NAME --role ...``, which reads the password from a prompt
or standard input (never from the command line, where ``ps`` and shell history see it).
Only operators may see unmasked phone numbers on the dashboard, or search by number.

Sessions are rows in the delivery log (``sessions``), so ending one is a DELETE that
every web process sees at once: logout ends that session; a password change, a role
change, ``users disable`` and ``users remove`` end all of the account's sessions.

Failed logins are counted in ``login_throttle`` per account name and per client
address, *before* the password is checked, in one atomic upsert: forty guesses sent
at once are forty increments, and only the first ``NAME_LIMIT`` are ever checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from .errors import UsageError
from .store import schema as t
from .store.sql import SqlStore

ROLES = ("auditor", "operator")
MIN_PASSWORD = 10
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")
# scrypt cost: n=2**14, r=8 takes ~50 ms and 16 MiB, a fair price per login and a real one per guess
_N, _R, _P = 2**14, 8, 1


@dataclass(frozen=True)
class Account:
    name: str
    role: str

    @property
    def may_unmask(self) -> bool:
        return self.role == "operator"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(base64.b64decode(digest)),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def add_user(store: SqlStore, name: str, role: str, password: str, *, replace: bool = False) -> Account:
    """Create (or with ``replace`` reset) an account; bad name, role or weak password is a ``UsageError``."""
    if not _NAME_RE.match(name):
        raise UsageError(f"account name {name!r}: use 2-64 letters, digits, '_', '.', '@' or '-'", field="name")
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; use one of {', '.join(ROLES)}", field="role")
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"password too short: at least {MIN_PASSWORD} characters", field="password")
    now = store.clock()
    a = t.accounts
    with store._write() as conn:
        exists = conn.execute(sa.select(a.c.name).where(a.c.name == name)).first()
        if exists and not replace:
            raise UsageError(
                f"account {name!r} exists already (use --replace to reset its role and password)",
                field="name",
            )
        values = {"role": role, "password_hash": hash_password(password), "updated_at": now}
        if exists:
            conn.execute(sa.update(a).where(a.c.name == name).values(**values))
            _end_sessions(conn, name)  # a new role or password must not ride on a login made before it
        else:
            conn.execute(sa.insert(a).values(name=name, created_at=now, **values))
    return Account(name, role)


def authenticate(store: SqlStore, name: str, password: str) -> Account | None:
    a = t.accounts
    with store._read() as conn:
        row = conn.execute(
            sa.select(a.c.name, a.c.role, a.c.password_hash, a.c.disabled).where(a.c.name == name)
        ).first()
    if row is None:
        # spend the same time as a wrong password so a name cannot be probed by timing
        check_password(password, _DUMMY)
        return None
    ok = check_password(password, row.password_hash)
    return Account(row.name, row.role) if ok and not row.disabled else None


def get(store: SqlStore, name: str) -> Account | None:
    a = t.accounts
    with store._read() as conn:
        row = conn.execute(sa.select(a.c.name, a.c.role).where(a.c.name == name, a.c.disabled.is_not(True))).first()
    return Account(row.name, row.role) if row else None


def list_users(store: SqlStore) -> list[dict[str, object]]:
    a = t.accounts
    with store._read() as conn:
        return [
            {"name": n, "role": r, "disabled": bool(d)}
            for n, r, d in conn.execute(sa.select(a.c.name, a.c.role, a.c.disabled).order_by(a.c.name))
        ]


def _require(conn: sa.Connection, name: str) -> None:
    a = t.accounts
    if conn.execute(sa.select(a.c.name).where(a.c.name == name)).first() is None:
        raise UsageError(f"no account named {name!r}", field="name")


def set_password(store: SqlStore, name: str, password: str) -> int:
    """A new password for ``name``; every session of the account ends. Returns how many ended."""
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"password too short: at least {MIN_PASSWORD} characters", field="password")
    a = t.accounts
    with store._write() as conn:
        _require(conn, name)
        conn.execute(
            sa.update(a).where(a.c.name == name).values(password_hash=hash_password(password), updated_at=store.clock())
        )
        return _end_sessions(conn, name)


def set_disabled(store: SqlStore, name: str, disabled: bool = True) -> int:
    """Disable (or enable again) an account; disabling ends its sessions at once. Returns how many ended."""
    a = t.accounts
    with store._write() as conn:
        _require(conn, name)
        conn.execute(sa.update(a).where(a.c.name == name).values(disabled=disabled, updated_at=store.clock()))
        return _end_sessions(conn, name) if disabled else 0


def remove_user(store: SqlStore, name: str) -> int:
    """Delete an account and end its sessions. Returns how many sessions ended."""
    a = t.accounts
    with store._write() as conn:
        _require(conn, name)
        conn.execute(sa.delete(a).where(a.c.name == name))
        return _end_sessions(conn, name)


def _end_sessions(conn: sa.Connection, name: str) -> int:
    return int(conn.execute(sa.delete(t.sessions).where(t.sessions.c.account == name)).rowcount)


# ------------------------------------------------------------------ sessions


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def start_session(store: SqlStore, account: Account, max_age: int) -> str:
    """A new session for ``account``; returns its random id (what the cookie carries, signed)."""
    session_id = secrets.token_urlsafe(32)
    now = store.clock()
    s = t.sessions
    with store._write() as conn:
        conn.execute(sa.delete(s).where(s.c.expires_at < now))  # expired sessions are not kept
        conn.execute(
            sa.insert(s).values(
                id_hash=_id_hash(session_id),
                account=account.name,
                role=account.role,
                created_at=now,
                expires_at=now + timedelta(seconds=max_age),
            )
        )
    return session_id


def session_account(store: SqlStore, session_id: str) -> Account | None:
    """The account of a live session: unexpired, account present and enabled, role unchanged since login."""
    s, a = t.sessions, t.accounts
    with store._read() as conn:
        row = conn.execute(
            sa.select(a.c.name, a.c.role)
            .select_from(s.join(a, a.c.name == s.c.account))
            .where(
                s.c.id_hash == _id_hash(session_id),
                s.c.expires_at > store.clock(),
                a.c.disabled.is_not(True),
                a.c.role == s.c.role,
            )
        ).first()
    return Account(row.name, row.role) if row else None


def end_session(store: SqlStore, session_id: str) -> None:
    with store._write() as conn:
        conn.execute(sa.delete(t.sessions).where(t.sessions.c.id_hash == _id_hash(session_id)))


# ------------------------------------------------------------------ login throttle

#: failed logins allowed per account name, and per client address, within ``WINDOW`` seconds
NAME_LIMIT = 5
ADDRESS_LIMIT = 30
WINDOW = 300


class Locked(Exception):
    """Too many login attempts for this name or from this address: the password was not checked."""


def login(store: SqlStore, name: str, password: str, address: str) -> Account | None:
    """Count the attempt, then (only if under both limits) check the password.

    The count is one atomic upsert per key (name, address), committed before scrypt runs,
    so parallel guesses cannot all pass a check made before any of them is counted.
    A successful login forgets the name's failures and gives the address its attempt back.
    """
    name_key, address_key = f"name:{name[:100]}", f"addr:{address[:100]}"
    now = store.clock()
    with store._write() as conn:
        # counters of windows long past are dropped, so names tried once do not pile up for ever
        lt = t.login_throttle
        conn.execute(sa.delete(lt).where(lt.c.window_start < now - timedelta(seconds=2 * WINDOW)))
        by_name = _count(store, conn, name_key, now)
        # the address limit bounds password checks: an attempt already refused for its name costs nothing
        by_address = _count(store, conn, address_key, now) if by_name <= NAME_LIMIT else 0
    if by_name > NAME_LIMIT or by_address > ADDRESS_LIMIT:
        raise Locked(name)
    account = authenticate(store, name, password)
    if account is not None:
        lt = t.login_throttle
        with store._write() as conn:
            conn.execute(sa.delete(lt).where(lt.c.key == name_key))
            conn.execute(sa.update(lt).where(lt.c.key == address_key, lt.c.count > 0).values(count=lt.c.count - 1))
    return account


def _count(store: SqlStore, conn: sa.Connection, key: str, now: datetime) -> int:
    lt = t.login_throttle
    stale = lt.c.window_start < now - timedelta(seconds=WINDOW)
    stmt = store._insert()(lt).values(key=key, window_start=now, count=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=[lt.c.key],
        set_={
            "count": sa.case((stale, 1), else_=lt.c.count + 1),
            "window_start": sa.case((stale, now), else_=lt.c.window_start),
        },
    ).returning(lt.c.count)
    return int(conn.execute(stmt).scalar_one())


_DUMMY = hash_password(secrets.token_hex(8))
