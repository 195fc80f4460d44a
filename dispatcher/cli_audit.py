"""``dispatch audit``, ``dispatch report`` and ``dispatch users``: the auditors' commands.

Kept apart from cli.py so the auditors' surface can grow without touching the
pipeline's commands; cli.py imports this module once, which registers the
sub-apps on its ``app``. The logic lives in audit.py, reports.py and accounts.py.
"""

from __future__ import annotations

import getpass
import socket
import sys
from collections.abc import Iterable
from typing import Any

import typer
from rich.table import Table

from . import audit, reports
from .cli import app, emit_json, err, out, runtime
from .errors import UsageError

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident ledger: verify it, query and export it.")
report_app = typer.Typer(no_args_is_help=True, help="Coverage, department and failure reports.")
users_app = typer.Typer(no_args_is_help=True, help="Dashboard accounts (roles auditor and operator).")
app.add_typer(audit_app, name="audit")
app.add_typer(report_app, name="report")
app.add_typer(users_app, name="users")


def _who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no passwd entry (containers): still say which host
        return f"uid?@{socket.gethostname()}"


@audit_app.command("verify")
def audit_verify(
    run_id: str | None = typer.Argument(None, help="one run (default: every run and the audit chain)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recompute the hash chains; exit 1 naming the first event that does not match."""
    rt = runtime()
    results = []
    broken = 0
    for res in audit.verify(rt.store, run_id):
        results.append(
            {
                "chain": res.chain,
                "events": res.events,
                "ok": res.problem is None,
                "problem": str(res.problem) if res.problem else None,
                "event_id": res.problem.event_id if res.problem else None,
                "seq": res.problem.seq if res.problem else None,
            }
        )
        if res.problem is not None:
            broken += 1
            if not as_json:
                err.print(f"BROKEN {res.problem}", markup=False)
        elif not as_json:
            out.print(f"ok {res.chain}: {res.events} events", markup=False)
    if as_json:
        emit_json({"ok": not broken, "chains": results})
    else:
        out.print(f"{len(results) - broken} of {len(results)} chains intact", markup=False)
    if broken:
        raise typer.Exit(1)


@audit_app.command("log")
def audit_log(
    campaign: str | None = typer.Option(None, help="campaign id"),
    run: str | None = typer.Option(None, help="run id"),
    district: str | None = typer.Option(None, help="district id or name"),
    segment: str | None = typer.Option(None, help="population group id or name"),
    state: str | None = typer.Option(None, help="events that moved a delivery INTO this state"),
    error_code: str | None = typer.Option(None, "--error-code"),
    phone: str | None = typer.Option(None, help="exact phone number (no patterns)"),
    since: str | None = typer.Option(None, help="from this date/time (2021-01-01; local time unless a zone is given)"),
    until: str | None = typer.Option(None, help="up to this date/time (a date includes the whole day)"),
    fmt: str = typer.Option("table", "--format", help="table, csv or jsonl (csv/jsonl stream any number of rows)"),
    limit: int | None = typer.Option(None, min=1, help="at most this many events (table: 100 by default)"),
    unmask: bool = typer.Option(False, "--unmask", help="show full numbers; the export is recorded in the ledger"),
) -> None:
    """Ledger events joined with their delivery and run, oldest first; numbers masked unless --unmask."""
    if fmt not in audit.FORMATS:
        raise UsageError(f"--format: expected one of {', '.join(audit.FORMATS)}, got {fmt!r}", field="format")
    rt = runtime()
    f = audit.LogFilter.parse(
        campaign=campaign,
        run=run,
        district=district,
        segment=segment,
        state=state,
        error_code=error_code,
        phone=phone,
        since=since,
        until=until,
    )
    # an unmasked export, or a search by number, is on record before the first row leaves
    audit.record_access(rt.store, actor=_who(), f=f, unmask=unmask, fmt=fmt, via="cli")
    if fmt == "table":
        n = _print_log_table(audit.iter_log(rt.store, f, unmask=unmask, limit=limit or 100))
        err.print(f"{n} events shown (use --format csv or jsonl for all)", markup=False)
        return
    n = audit.write_rows(audit.iter_log(rt.store, f, unmask=unmask, limit=limit), fmt, sys.stdout)
    sys.stdout.flush()
    err.print(f"{n} events", markup=False)


def _print_log_table(rows: Iterable[dict[str, Any]]) -> int:
    """Events grouped under a heading per run and local date, so each line fits 80 columns.

    Times are Asia/Shanghai like every report; districts by their Chinese names; the result
    column shows what the gateway said (provider id or error code), else the gateway's name.
    """
    from datetime import datetime

    from . import domain

    n = 0
    heading: tuple[str, str] | None = None
    table: Table | None = None

    def flush() -> None:
        if table is not None:
            out.print(table)

    for row in rows:
        n += 1
        at = datetime.fromisoformat(row["at"]).astimezone(audit.LOCAL_TZ)
        key = (row["run_id"] or "audit", at.date().isoformat())
        if key != heading:
            flush()
            heading = key
            out.print(f"run {key[0]}, {key[1]} (Asia/Shanghai)", markup=False, style="bold")
            table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False)
            for col, width in (("time", 8), ("phone", 14), ("district", 10), ("change", 19), ("result", 12),
                               ("by", 12)):  # fmt: skip
                table.add_column(col, max_width=width, no_wrap=True, overflow="ellipsis")
        district = domain.district(row["district"] or "")
        result = row["provider_id"] or row["error_code"] or row["gateway"] or ""
        assert table is not None
        table.add_row(
            at.strftime("%H:%M:%S"),
            row["phone"] or "",
            district.name if district else (row["district"] or ""),
            f"{row['from_state'] or '-'}→{row['to_state'] or '-'}",
            result,
            row["actor"],
        )
    flush()
    return n


@audit_app.command("exports")
def audit_exports(limit: int = typer.Option(50, min=1), as_json: bool = typer.Option(False, "--json")) -> None:
    """Who exported or viewed unmasked numbers, or searched by number, newest first (the audit chain)."""
    rows = audit.audit_events(runtime().store, limit)
    if as_json:
        emit_json({"exports": rows})
        return
    for row in rows:
        out.print(
            f"{row['at'][:19]} {row['actor']} {row['kind']} via {row['payload'].get('via')} "
            f"filter {row['payload'].get('filter')}",
            markup=False,
        )


# ------------------------------------------------------------------ reports


def _report_out(kind: str, report: dict, as_json: bool, fmt: str) -> bool:
    """JSON or CSV if asked; False when the caller should print its table."""
    if fmt not in ("table", "csv"):
        raise UsageError(f"--format: expected table or csv, got {fmt!r}", field="format")
    if as_json:
        emit_json(report)
        return True
    if fmt == "csv":
        reports.write_csv(kind, report, sys.stdout)
        return True
    return False


@report_app.command("coverage")
def report_coverage(
    period: str | None = typer.Option(None, help="2021Q1, 2021-03 or 2021 (default: the current quarter)"),
    as_json: bool = typer.Option(False, "--json"),
    fmt: str = typer.Option("table", "--format", help="table or csv"),
) -> None:
    """District x population group: eligible, reached, delivered, percent reached."""
    from . import domain

    rt = runtime()
    p = reports.parse_period(period or reports.quarter_of(rt.clock()))
    report = reports.coverage(rt.store, p)
    if _report_out("coverage", report, as_json, fmt):
        return
    # groups down, districts across: six columns fit a terminal, thirteen do not
    table = Table(title=f"coverage {report['period']} ({report['runs']} runs): percent of eligible reached")
    table.add_column("group")
    for d in domain.DISTRICTS:
        table.add_column(d.name, justify="right")
    cells = {(c["district"], c["segment"]): c for c in report["cells"]}
    for s in domain.SEGMENTS:
        table.add_row(s.name, *[f"{cells[(d.id, s.id)]['percent']}%" for d in domain.DISTRICTS])
    table.add_row("all residents", *[f"{d['percent']}% of {d['eligible']}" for d in report["districts"]], style="bold")
    out.print(table)


@report_app.command("departments")
def report_departments(
    year: str = typer.Option(..., help="a year (2021), or a quarter/month"),
    as_json: bool = typer.Option(False, "--json"),
    fmt: str = typer.Option("table", "--format", help="table or csv"),
) -> None:
    """Per owning department: campaigns, runs, recipients, sent, delivered, failed by cause, parts sent."""
    report = reports.departments(runtime().store, reports.parse_period(year, "year"))
    if _report_out("departments", report, as_json, fmt):
        return
    table = Table(title=f"departments {report['period']}")
    for col in (
        "department",
        "campaigns",
        "runs",
        "recipients",
        "sent",
        "delivered",
        "failed",
        "parts sent",
        "causes",
    ):
        table.add_column(col)
    for d in report["departments"]:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(d["failed_by_cause"].items()))
        table.add_row(
            d["name"],
            *[str(d[k]) for k in ("campaigns", "runs", "recipients", "sent", "delivered", "failed", "parts_sent")],
            causes,
        )
    out.print(table)


@report_app.command("failures")
def report_failures(
    period: str | None = typer.Option(None, help="2021Q1, 2021-03 or 2021 (default: all time)"),
    as_json: bool = typer.Option(False, "--json"),
    fmt: str = typer.Option("table", "--format", help="table or csv"),
) -> None:
    """Rows that did not go out, by error code, gateway and state."""
    report = reports.failures(runtime().store, reports.parse_period(period) if period else None)
    if _report_out("failures", report, as_json, fmt):
        return
    table = Table(title=f"failures ({report['period']})")
    for col in ("error code", "gateway", "state", "count"):
        table.add_column(col)
    for row in report["failures"]:
        table.add_row(row["error_code"], row["gateway"], row["state"], str(row["count"]))
    out.print(table)


# ------------------------------------------------------------------ users


@users_app.command("add")
def users_add(
    name: str,
    role: str = typer.Option(..., help="auditor or operator"),
    replace: bool = typer.Option(False, "--replace", help="reset an existing account's role and password"),
) -> None:
    """Create a dashboard account; the password is read from a prompt, or from standard input when piped."""
    from .accounts import add_user

    rt = runtime()
    account = add_user(rt.store, name, role, _read_password(), replace=replace)
    out.print(f"account {account.name} ({account.role}) saved", markup=False)


@users_app.command("list")
def users_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Dashboard accounts and their roles (never their passwords)."""
    from .accounts import list_users

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
    from .accounts import set_password

    ended = set_password(runtime().store, name, _read_password())
    out.print(f"password of {name} changed; {ended} session(s) ended", markup=False)


@users_app.command("disable")
def users_disable(name: str) -> None:
    """Refuse the account's logins and end its sessions at once (the name stays in the ledger's actors)."""
    from .accounts import set_disabled

    ended = set_disabled(runtime().store, name, True)
    out.print(f"account {name} disabled; {ended} session(s) ended", markup=False)


@users_app.command("enable")
def users_enable(name: str) -> None:
    """Let a disabled account log in again."""
    from .accounts import set_disabled

    set_disabled(runtime().store, name, False)
    out.print(f"account {name} enabled", markup=False)


@users_app.command("remove")
def users_remove(name: str) -> None:
    """Delete the account and end its sessions at once."""
    from .accounts import remove_user

    ended = remove_user(runtime().store, name)
    out.print(f"account {name} removed; {ended} session(s) ended", markup=False)
