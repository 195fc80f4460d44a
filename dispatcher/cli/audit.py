"""``dispatch audit verify``, ``log`` and ``exports``: the tamper-evident ledger, for auditors.

The logic lives in audit.py; this module only parses options and prints.
"""

from __future__ import annotations

import getpass
import socket
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import typer
from rich.table import Table

from .. import audit, domain
from ..errors import UsageError
from .console import emit_json, err, out, runtime

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident ledger: verify it, query and export it.")


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
    """Who exported or viewed unmasked numbers, searched by number, read or purged traces, submitted, approved
    or voided campaign versions, newest first."""
    rows = audit.audit_events(runtime().store, limit)
    if as_json:
        emit_json({"exports": rows})
        return
    for row in rows:
        payload = row["payload"]
        # exports and searches carry the filter; trace views and purges say what they looked at or cleared
        what = payload.get("filter") if "filter" in payload else {
            k: v for k, v in payload.items() if k not in ("via", "phone_hmac")
        }  # fmt: skip
        via = f" via {payload['via']}" if "via" in payload else ""  # approvals are made by command or dashboard alike
        out.print(
            f"{row['at'][:19]} {row['actor']} {row['kind']}{via} {'filter' if 'filter' in payload else 'on'} {what}",
            markup=False,
        )
