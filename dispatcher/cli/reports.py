"""``dispatch report coverage``, ``departments`` and ``failures``: what the programme reached.

The logic lives in reports.py; this module only parses options and prints.
"""

from __future__ import annotations

import sys

import typer
from rich.table import Table

from .. import domain, reports
from ..errors import UsageError
from .console import emit_json, out, runtime

report_app = typer.Typer(no_args_is_help=True, help="Coverage, department and failure reports.")


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
    """District x population group: eligible, reached, delivered, undelivered, unconfirmed, percent reached."""
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
    # what the carriers confirmed of those reached: a silent carrier shows up as unconfirmed, not as reached alone
    for figure in ("delivered", "undelivered", "unconfirmed"):
        table.add_row(f"  {figure}", *[str(d[figure]) for d in report["districts"]])
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
    assessor = report["assessed_by"]
    table = Table(title=f"departments {report['period']}" + (f" (assessed by {assessor['name']})" if assessor else ""))
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
