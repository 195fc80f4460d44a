"""``dispatch submit``, ``approve`` and ``approvals``: two-person approval of campaign versions.

The rules live in approvals.py; this module proves who ``--as`` names (the account's
password, read from a prompt or from standard input when piped, never from the command
line), and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from .. import approvals
from ..accounts import Locked, login
from ..campaigns import check_paths, load_campaign
from ..errors import UsageError
from ..runtime import Runtime
from .console import emit_json, out, runtime

AS_HELP = "your operator account (dispatch users add NAME --role operator); its password is asked for"
VERSION_HELP = "the short sha you reviewed (dispatch approvals): refused if the files changed since"


def _read_password() -> str:
    if sys.stdin.isatty():
        return str(typer.prompt("password", hide_input=True))
    return sys.stdin.readline().rstrip("\r\n")


def _operator(rt: Runtime, name: str) -> str:
    """The name of the enabled operator account ``name`` once its password checks out; else exit 2.

    The attempt goes through the login throttle like a dashboard login, so the command line is
    no way round its limit on guesses.
    """
    try:
        account = login(rt.store, name, _read_password(), "cli")
    except Locked as exc:
        raise UsageError(f"too many failed attempts for {name!r}: wait a few minutes", field="as") from exc
    if account is None:
        raise UsageError(f"wrong password, or no enabled account named {name!r}", field="as")
    if account.role != "operator":
        raise UsageError(f"{name} is an {account.role}: only operators submit and approve campaigns", field="as")
    return account.name


def submit(
    campaign: Path,
    as_name: str = typer.Option(..., "--as", help=AS_HELP),
    version: str | None = typer.Option(None, "--version", help=VERSION_HELP),
) -> None:
    """Submit CAMPAIGN's current version (its file and every template it uses) for a second operator's approval."""
    rt = runtime()
    loaded = load_campaign(campaign, rt.settings.templates_dir, rt.clock(), gateways=rt.known_gateways())
    name = _operator(rt, as_name)
    outcome, row = approvals.submit(rt, loaded, by=name, expected=version)
    v = approvals.short(row.version)
    cid = loaded.campaign.id
    if outcome == "submitted":
        out.print(
            f"campaign {cid}: version {v} submitted by {name}; a second operator runs "
            f"`dispatch approve {campaign} --as NAME`",
            markup=False,
        )
    elif outcome == "already_approved":
        out.print(f"campaign {cid}: version {v} is already approved by {row.approved_by}", markup=False)
    else:
        out.print(f"campaign {cid}: version {v} is already submitted by {row.submitted_by}", markup=False)


def approve(
    campaign: Path,
    as_name: str = typer.Option(..., "--as", help=AS_HELP),
    version: str | None = typer.Option(None, "--version", help=VERSION_HELP),
) -> None:
    """Approve CAMPAIGN's current version, submitted by another operator: real gateways may then send it."""
    rt = runtime()
    loaded = load_campaign(campaign, rt.settings.templates_dir, rt.clock(), gateways=rt.known_gateways())
    name = _operator(rt, as_name)
    outcome, row = approvals.approve(rt, loaded, by=name, expected=version)
    v = approvals.short(row.version)
    cid = loaded.campaign.id
    if outcome == "approved":
        out.print(f"campaign {cid}: version {v} approved by {name} (submitted by {row.submitted_by})", markup=False)
    else:
        out.print(f"campaign {cid}: version {v} is already approved by {row.approved_by}", markup=False)


def approvals_cmd(
    paths: list[Path] = typer.Argument(None, help="campaign files or folders (default: DISPATCH_CAMPAIGNS_DIR)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Each campaign's current version and its approval: unapproved, submitted, approved or voided by an edit."""
    rt = runtime()
    loaded, errors = check_paths(
        paths or [rt.settings.campaigns_dir], rt.settings.templates_dir, rt.clock(), gateways=rt.known_gateways()
    )
    items = []
    for lc in sorted(loaded, key=lambda lc: lc.campaign.id):
        version, state = approvals.current(rt, lc, actor="system:approvals")
        row = state.current
        items.append({
            "campaign_id": lc.campaign.id,
            "path": str(lc.path),
            "version": version,
            "state": approvals.state_name(state),
            "description": approvals.describe(state),
            "submitted_by": row.submitted_by if row else None,
            "submitted_at": row.submitted_at.isoformat() if row else None,
            "approved_by": row.approved_by if row else None,
            "approved_at": row.approved_at.isoformat() if row and row.approved_at else None,
            "voided_version": state.voided.version if state.voided else None,
        })  # fmt: skip
    if as_json:
        emit_json({"approvals": items, "invalid": [str(e) for e in errors]})
        return
    table = Table()
    for col in ("campaign", "version", "state"):
        table.add_column(col)
    for item in items:
        table.add_row(str(item["campaign_id"]), approvals.short(str(item["version"])), str(item["description"]))
    out.print(table)
    for error in errors:
        out.print(f"not listed (invalid): {error}", markup=False)
