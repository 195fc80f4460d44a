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

from .errors import UsageError
from .store import SqlStore, StoredAccount

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
    if store.accounts.put(name, role, hash_password(password), replace=replace) == "exists":
        raise UsageError(
            f"account {name!r} exists already (use --replace to reset its role and password)",
            field="name",
        )
    return Account(name, role)


def authenticate(store: SqlStore, name: str, password: str) -> Account | None:
    row = store.accounts.credentials(name)
    if row is None:
        # spend the same time as a wrong password so a name cannot be probed by timing
        check_password(password, _DUMMY)
        return None
    ok = check_password(password, row.password_hash)
    return Account(row.name, row.role) if ok and not row.disabled else None


def get(store: SqlStore, name: str) -> Account | None:
    row = store.accounts.get(name)
    return Account(row.name, row.role) if row else None


def list_users(store: SqlStore) -> list[dict[str, object]]:
    return [{"name": a.name, "role": a.role, "disabled": a.disabled} for a in store.accounts.all_accounts()]


def set_password(store: SqlStore, name: str, password: str) -> int:
    """A new password for ``name``; every session of the account ends. Returns how many ended."""
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"password too short: at least {MIN_PASSWORD} characters", field="password")
    return store.accounts.set_password_hash(name, hash_password(password))


def set_disabled(store: SqlStore, name: str, disabled: bool = True) -> int:
    """Disable (or enable again) an account; disabling ends its sessions at once. Returns how many ended."""
    return store.accounts.set_disabled(name, disabled)


def remove_user(store: SqlStore, name: str) -> int:
    """Delete an account and end its sessions. Returns how many sessions ended."""
    return store.accounts.remove(name)


# ------------------------------------------------------------------ sessions


def start_session(store: SqlStore, account: Account, max_age: int) -> str:
    """A new session for ``account``; returns its random id (what the cookie carries, signed)."""
    session_id = secrets.token_urlsafe(32)
    store.accounts.start_session(session_id, StoredAccount(account.name, account.role), max_age)
    return session_id


def session_account(store: SqlStore, session_id: str) -> Account | None:
    """The account of a live session: unexpired, account present and enabled, role unchanged since login."""
    row = store.accounts.session_account(session_id)
    return Account(row.name, row.role) if row else None


def end_session(store: SqlStore, session_id: str) -> None:
    store.accounts.end_session(session_id)


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
    by_name, by_address = store.accounts.count_attempt(name_key, address_key, name_limit=NAME_LIMIT, window=WINDOW)
    if by_name > NAME_LIMIT or by_address > ADDRESS_LIMIT:
        raise Locked(name)
    account = authenticate(store, name, password)
    if account is not None:
        store.accounts.forgive(name_key, address_key)
    return account


#: what an unknown name's password is checked against, so that it takes as long as a known one's. A hash in the
#: stored form with a random salt and digest: no password matches it, and building it costs no scrypt run (one
#: at import added 50 ms to every `dispatch` command and worker start)
_DUMMY = (
    f"scrypt${_N}${_R}${_P}${base64.b64encode(secrets.token_bytes(16)).decode()}"
    f"${base64.b64encode(secrets.token_bytes(32)).decode()}"
)
