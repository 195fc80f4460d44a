"""``dispatch users add``, ``list``, ``passwd``, ``disable``, ``enable`` and ``remove``: dashboard accounts.

The logic lives in accounts.py; this module only reads passwords and prints.
"""

from __future__ import annotations

import sys

import typer

from ..accounts import add_user, list_users, remove_user, set_disabled, set_password
from .console import emit_json, out, runtime

users_app = typer.Typer(no_args_is_help=True, help="Dashboard accounts (roles auditor and operator).")


@users_app.command("add")
def users_add(
    name: str,
    role: str = typer.Option(..., help="auditor or operator"),
    replace: bool = typer.Option(False, "--replace", help="reset an existing account's role and password"),
) -> None:
    """Create a dashboard account; the password is read from a prompt, or from standard input when piped."""
    rt = runtime()
    account = add_user(rt.store, name, role, _read_password(), replace=replace)
    out.print(f"account {account.name} ({account.role}) saved", markup=False)


@users_app.command("list")
def users_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Dashboard accounts and their roles (never their passwords)."""
    users = list_users(runtime().store)
    if as_json:
        emit_json({"users": users})
        return
    for u in users:
        out.print(f"{u['name']}\t{u['role']}{chr(9) + 'disabled' if u['disabled'] else ''}", markup=False)


def _read_password() -> str:
    if sys.stdin.isatty():
        return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\r\n")


@users_app.command("passwd")
def users_passwd(name: str) -> None:
    """Set a new password (prompt, or standard input when piped); the account's sessions end at once."""
    ended = set_password(runtime().store, name, _read_password())
    out.print(f"password of {name} changed; {ended} session(s) ended", markup=False)


@users_app.command("disable")
def users_disable(name: str) -> None:
    """Refuse the account's logins and end its sessions at once (the name stays in the ledger's actors)."""
    ended = set_disabled(runtime().store, name, True)
    out.print(f"account {name} disabled; {ended} session(s) ended", markup=False)


@users_app.command("enable")
def users_enable(name: str) -> None:
    """Let a disabled account log in again."""
    set_disabled(runtime().store, name, False)
    out.print(f"account {name} enabled", markup=False)


@users_app.command("remove")
def users_remove(name: str) -> None:
    """Delete the account and end its sessions at once."""
    ended = remove_user(runtime().store, name)
    out.print(f"account {name} removed; {ended} session(s) ended", markup=False)
