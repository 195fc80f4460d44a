"""Dashboard accounts: a name, a role (``auditor`` or ``operator``) and an scrypt password hash.

There is no default account and no default password: the first account is made
with ``dispatch users add NAME --role ...``, which reads the password from a prompt
or standard input (never from the command line, where ``ps`` and shell history see it).
Only operators may see unmasked phone numbers on the dashboard.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

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
        else:
            conn.execute(sa.insert(a).values(name=name, created_at=now, **values))
    return Account(name, role)


def authenticate(store: SqlStore, name: str, password: str) -> Account | None:
    a = t.accounts
    with store._read() as conn:
        row = conn.execute(sa.select(a.c.name, a.c.role, a.c.password_hash).where(a.c.name == name)).first()
    if row is None:
        # spend the same time as a wrong password so a name cannot be probed by timing
        check_password(password, _DUMMY)
        return None
    return Account(row.name, row.role) if check_password(password, row.password_hash) else None


def get(store: SqlStore, name: str) -> Account | None:
    a = t.accounts
    with store._read() as conn:
        row = conn.execute(sa.select(a.c.name, a.c.role).where(a.c.name == name)).first()
    return Account(row.name, row.role) if row else None


def list_users(store: SqlStore) -> list[Account]:
    a = t.accounts
    with store._read() as conn:
        return [Account(n, r) for n, r in conn.execute(sa.select(a.c.name, a.c.role).order_by(a.c.name))]


_DUMMY = hash_password(secrets.token_hex(8))
