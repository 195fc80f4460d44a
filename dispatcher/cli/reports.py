"""``dispatch report coverage``, ``departments``, ``assessment`` and ``failures``: what the programme reached.

The logic lives in reports.py; this module only parses options and prints.
"""

from __future__ import annotations

import sys

import typer
from rich.table import Table
from rich.text import Text

from .. import domain, reports
from ..errors import UsageError
from ..targets import QUARTERS
from ..targets import load as load_targets
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
    rt = runtime()
    report = reports.departments(rt.store, reports.parse_period(year, "year"), rt.settings.part_prices)
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
        "spend CNY",
        "by quarter",
        "causes",
    ):
        table.add_column(col)
    for d in report["departments"]:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(d["failed_by_cause"].items()))
        table.add_row(
            d["name"],
            *[str(d[k]) for k in ("campaigns", "runs", "recipients", "sent", "delivered", "failed", "parts_sent")],
            f"{d['spend_cny']:.2f}",
            ", ".join(f"{q[-2:]} {v:.2f}" for q, v in d["spend_by_quarter"].items()),
            causes,
        )
    out.print(table)


@report_app.command("assessment")
def report_assessment(
    year: str = typer.Option(..., help="the year assessed, e.g. 2021"),
    quarter: str | None = typer.Option(None, help="only this quarter's rows in the table (Q1-Q4)"),
    as_json: bool = typer.Option(False, "--json"),
    fmt: str = typer.Option("table", "--format", help="table or csv"),
) -> None:
    """Every department and town per quarter against targets.yaml: coverage, pushes, met, shortfall, spend."""
    rt = runtime()
    chosen = reports.parse_year(year)
    if quarter is not None and quarter.upper() not in QUARTERS:
        raise UsageError(f"--quarter: expected Q1, Q2, Q3 or Q4, got {quarter!r}", field="quarter")
    report = reports.assessment(rt.store, chosen, load_targets(rt.settings.targets_path), rt.settings.part_prices)
    if quarter is not None:
        report = {**report, "rows": [r for r in report["rows"] if r["quarter"].endswith(quarter.upper())]}
    if _report_out("assessment", report, as_json, fmt):
        return
    in_force = report["targets_year"]
    table = Table(
        title=f"assessment {report['year']} ({report['runs']} runs; targets {report['targets']}"
        + (f", those of {in_force}" if in_force not in (None, report["year"]) else "")
        + ")"
    )
    for col in ("quarter", "department / town", "coverage", "target", "pushes", "target", "met", "shortfall",
                "spend CNY"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("quarter", "department / town", "shortfall") else "right")
    for r in report["rows"]:
        met = {True: Text("met", "green"), False: Text("not met", "red"), None: Text("no target")}[r["met"]]
        by_group = ", ".join(f"{_name(k)} {v}" for k, v in r["shortfall_by_group"].items())
        short = f"{r['shortfall']} residents" + (f" ({by_group})" if by_group else "")
        if r["pushes"] < (r["target_pushes"] or 0):
            short += f"; {r['target_pushes'] - r['pushes']} push(es)"
        table.add_row(
            r["quarter"][-2:],
            f"{r['name']} ({'town' if r['kind'] == 'town' else 'dept'})",
            f"{100 * r['coverage']:.1f}% of {r['eligible']}",
            "" if r["target_coverage"] is None else f"{100 * r['target_coverage']:.0f}%",
            str(r["pushes"]),
            "" if r["target_pushes"] is None else str(r["target_pushes"]),
            met,
            short if r["met"] is False else "",
            f"{r['spend_cny']:.2f}",
        )
    out.print(table)
    # who spent it: the owners of the runs, the police sub-bureau's quarterly themes included
    shown = {r["quarter"] for r in report["rows"]}
    for s in report["spend"]:
        if s["quarter"] in shown:
            out.print(f"spend {s['quarter']}: {s['name']} {s['spend_cny']:.2f} CNY ({s['parts']} parts)", markup=False)
    out.print(f"total spend {report['year']}: {report['total_spend_cny']:.2f} CNY", markup=False)


def _name(key: str) -> str:
    found = domain.segment(key) or domain.district(key)
    return found.name if found else key


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
