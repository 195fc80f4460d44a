"""``dispatch alert send|close|status``, ``dispatch alerts``, ``dispatch roster import``, ``dispatch apikeys``
and ``dispatch report alerts``: the early-warning desk.

The logic lives in alerting.py; this module only parses options and prints. Numbers are printed masked.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .. import alerting
from ..errors import UsageError
from ..runtime import Runtime
from ..store import OPEN_STATES
from .console import emit_json, err, out, runtime

alert_app = typer.Typer(no_args_is_help=True, help="Early warning: reach one resident now, escalate until confirmed.")
roster_app = typer.Typer(no_args_is_help=True, help="Who is told when an alert goes unconfirmed, per grid.")
apikeys_app = typer.Typer(no_args_is_help=True, help="Keys that may post alerts to POST /api/alerts.")


@alert_app.command("send")
def alert_send(
    phone: str = typer.Option(..., "--phone", help="the resident's mobile number"),
    fraud_type: str = typer.Option(..., "--type", help=f"fraud type: {', '.join(alerting.FRAUD_TYPES)}"),
    name: str = typer.Option("", "--name", help="the resident's name, if known"),
    source: str | None = typer.Option(None, "--source", help="where the clue came from"),
    external_id: str | None = typer.Option(None, "--id", help="the anti-fraud centre's id: a repeat creates nothing"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Take an alert: SMS and call at once on the urgent lane, escalated by alerting.yaml until confirmed."""
    rt = runtime()
    req = alerting.AlertRequest(
        phone=phone, fraud_type=fraud_type, name=name, source=source, external_id=external_id, actor="operator"
    )
    taken = alerting.send_alert(rt, req)
    if rt.settings.embedded and taken.fired:
        _send_here(rt, taken.fired)
    data = {**alerting.alert_json(taken.alert), "created": taken.created, "fired": taken.fired}
    if as_json:
        emit_json(data)
        return
    a = taken.alert
    if taken.created:
        out.print(
            f"alert {a.id} {a.fraud_type} to {data['phone']} ({a.district or 'not in the registry'}): "
            f"{len(taken.fired)} step(s) fired",
            markup=False,
        )
    else:
        out.print(f"alert {a.id} exists for id {a.external_id} ({a.status}): nothing new sent", markup=False)


def _send_here(rt: Runtime, run_ids: list[str], timeout: float = 120.0) -> None:
    """No worker process takes runs from an in-process broker: send them here before returning."""
    from ..workers import start_worker, stop_worker, stub_idle

    worker, heartbeat = start_worker(rt)
    try:
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while time.monotonic() < deadline and not rt.fatal:
            if not any(rt.store.counts(r).get(s) for r in run_ids for s in OPEN_STATES):
                return
            if stub_idle(rt):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 1.0:
                    return  # what is still open waits on an operator (unknown rows)
            else:
                idle_since = None
            time.sleep(0.1)
    finally:
        stop_worker(rt, worker, heartbeat)


@alert_app.command("close")
def alert_close(
    alert_id: str,
    outcome: str = typer.Option(..., "--outcome", help=" | ".join(alerting.OUTCOMES)),
    note: str | None = typer.Option(None, "--note"),
) -> None:
    """Record the outcome; the steps still to come are cancelled."""
    a = alerting.close_alert(runtime(), alert_id, outcome, note, actor="operator")
    out.print(f"alert {a.id} closed: {a.outcome}", markup=False)


@alert_app.command("status")
def alert_status(alert_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The alert, its steps and what their runs did."""
    st = alerting.alert_status(runtime(), alert_id)
    if as_json:
        emit_json(st)
        return
    out.print(
        f"alert {st['id']} {st['fraud_type']} ({st['fraud_name']}) {st['phone']} "
        f"district={st['district'] or '-'} grid={st['grid'] or '-'} status={st['status']}"
        + (f" outcome={st['outcome']}" if st["outcome"] else ""),
        markup=False,
    )
    out.print(
        f"created {st['created_at']}  first contact {st['first_contact_at'] or '-'}  "
        f"confirmed {st['confirmed_at'] or '-'}  closed {st['closed_at'] or '-'}",
        markup=False,
    )
    for s in st["steps"]:
        rows = ", ".join(
            f"{r['phone']} {r['state']}{'/' + r['error_code'] if r['error_code'] else ''}" for r in s["deliveries"]
        )
        out.print(
            f"  step {s['seq']} {s['action']:<11} due {s['due_at']}  {s['state']:<9} {s['run_id'] or ''} "
            f"{rows}{(' (' + s['detail'] + ')') if s['detail'] else ''}",
            markup=False,
        )
    for m in st["milestones"]:
        out.print(f"  {m['at']}  {m['name']}", markup=False)


def alerts_list(
    open_only: bool = typer.Option(False, "--open", help="only alerts not yet closed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Alerts, newest first."""
    items = [alerting.alert_json(a) for a in runtime().store.alerts.recent(open_only=open_only)]
    if as_json:
        emit_json({"alerts": items})
        return
    for a in items:
        out.print(
            f"{a['id']}\t{a['status']}\t{a['outcome'] or '-'}\t{a['fraud_type']}\t{a['phone']}\t"
            f"{a['district'] or '-'}\t{a['created_at']}",
            markup=False,
        )


@roster_app.command("import")
def roster_import(path: Path) -> None:
    """Import grid workers and police duty numbers (CSV: grid, role, name, phone); bad rows are listed, exit 2."""
    result = alerting.import_roster(runtime(), path)
    for e in result.errors:
        err.print(str(e), markup=False)
    out.print(f"{result.imported} roster row(s) imported, {len(result.errors)} refused", markup=False)
    if result.errors:
        raise typer.Exit(2)


@apikeys_app.command("add")
def apikeys_add(name: str) -> None:
    """Make a key; it is printed once and only its hash is kept."""
    key = alerting.new_api_key(runtime(), name)
    out.print(key, markup=False)


@apikeys_app.command("list")
def apikeys_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Key names and whether they are revoked (never the keys)."""
    keys = runtime().store.alerts.list_keys()
    if as_json:
        emit_json({"keys": keys})
        return
    for k in keys:
        revoked = f"revoked {k['revoked_at']:%Y-%m-%d %H:%M}" if k["revoked_at"] else "active"
        out.print(f"{k['name']}\t{revoked}", markup=False)


@apikeys_app.command("revoke")
def apikeys_revoke(name: str) -> None:
    """Refuse the key from now on."""
    runtime().store.alerts.revoke_key(name)
    out.print(f"API key {name} revoked", markup=False)


def report_alerts(
    period: str | None = typer.Option(None, help="2021Q3, 2021-07 or 2021 (default: the current quarter)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Alerts by district, fraud type and outcome; time to first contact and to confirmation (p50/p95)."""
    from .. import reports

    rt = runtime()
    if period is not None and not period.strip():
        raise UsageError("--period is empty", field="period")
    data = alerting.report(rt, period or reports.quarter_of(rt.clock()))
    if as_json:
        emit_json(data)
        return
    out.print(f"alerts {data['period']}: {data['alerts']} ({data['open']} open)", markup=False)
    for label in ("by_district", "by_fraud_type", "by_outcome"):
        out.print(f"  {label[3:]}: " + ", ".join(f"{k} {v}" for k, v in data[label].items()), markup=False)
    fc, cf = data["first_contact_seconds"], data["confirmation_seconds"]
    out.print(f"  first contact ({data['reached']}): p50 {fc['p50']} s, p95 {fc['p95']} s", markup=False)
    out.print(f"  confirmation ({data['confirmed']}): p50 {cf['p50']} s, p95 {cf['p95']} s", markup=False)
