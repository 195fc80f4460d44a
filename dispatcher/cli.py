"""The ``dispatch`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 bad input. Every ``InputError`` is printed
as one line (``path:line:column: field: message``) with no traceback, before
anything is written or sent.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

import click
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import domain, logs
from .errors import DispatchError, InputError, StoreError, UsageError
from .redact import scrub
from .runtime import Runtime
from .settings import Settings
from .term import SafeConsole

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Anti-fraud SMS campaign dispatcher.",
)
audience_app = typer.Typer(no_args_is_help=True, help="The resident registry.")
app.add_typer(audience_app, name="audience")
schedule_app = typer.Typer(no_args_is_help=True, help="Campaign schedules.")
app.add_typer(schedule_app, name="schedule")

# piped or captured output (CI logs, `make demo | tee`) gets room for six district columns; neither console
# obeys markup or escape sequences in what it prints (term.py): titles and messages come from files and providers
out = SafeConsole(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = SafeConsole(stderr=True, highlight=False, soft_wrap=True)


class State:
    runtime: Runtime | None = None
    #: the level logging was configured with: DISPATCH_LOG_LEVEL, or the command's default
    log_level: str = "WARNING"


def runtime(default_level: str = "WARNING") -> Runtime:
    """The process's Runtime, built once from the environment; long-running commands pass INFO."""
    if State.runtime is None:
        settings = Settings.from_env()
        State.log_level = settings.log_level or default_level
        logs.configure(settings.log_format or ("console" if sys.stderr.isatty() else "json"), State.log_level)
        State.runtime = Runtime(settings)
    return State.runtime


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")


def _district_name(district_id: str) -> str:
    d = domain.district(district_id)
    return d.name if d else district_id


# ------------------------------------------------------------------ validate / preview


@app.command()
def validate(paths: list[Path] = typer.Argument(None, help="campaign files or folders (default: campaigns/)")) -> None:
    """Check campaign files: schema, districts, segments, templates, variables, length."""
    from .campaigns import check_paths

    rt = runtime()
    loaded, errors = check_paths(paths or [rt.settings.campaigns_dir], rt.settings.templates_dir, rt.clock())
    for error in errors:
        err.print(str(error), markup=False)
    if errors:
        raise typer.Exit(2)
    for lc in loaded:
        out.print(f"ok {lc.path} ({lc.campaign.id}: {', '.join(lc.campaign.template_names())})", markup=False)


@app.command()
def preview(
    campaign: Path,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Show who would be messaged and exactly what they would read. Sends nothing."""
    from .campaigns import load_campaign
    from .runs import audience_filter
    from .sms import part_lines, split_parts
    from .templates import SAMPLE_RECIPIENT

    rt = runtime()
    loaded = load_campaign(campaign, rt.settings.templates_dir, rt.clock())
    matrix = rt.store.audience_matrix(audience_filter(loaded))
    variants = []
    for name in loaded.campaign.template_names():
        text, seg = loaded.composer_for(name).render(SAMPLE_RECIPIENT)
        variants.append(
            {"template": name, "text": text, "encoding": seg.encoding, "chars": seg.chars, "parts": seg.parts}
        )
        variants[-1]["part_texts"] = split_parts(text)
    current = loaded.template_now_or_next(rt.clock())
    composer = loaded.composer_for(current)
    total_parts = recipients = 0
    for row in rt.store.iter_audience(audience_filter(loaded)):
        if row.opted_out:
            continue
        recipients += 1
        total_parts += composer.render({"name": row.name, "district": row.district, "grid": row.grid})[1].parts
    report = {
        "campaign_id": loaded.campaign.id,
        "recipients": recipients,
        "opted_out": sum(v["opted_out"] for v in matrix["by_district"].values()),
        "by_district": matrix["by_district"],
        "by_district_segment": matrix["by_district_segment"],
        "by_district_grid": matrix["by_district_grid"],
        "variants": variants,
        "template_now": current,
        "total_parts": total_parts,
    }
    if as_json:
        emit_json(report)
        return
    districts = [d for d in domain.DISTRICTS if d.id in matrix["by_district"]]
    totals = {
        d.id: matrix["by_district"][d.id]["selected"] - matrix["by_district"][d.id]["opted_out"] for d in districts
    }
    out.print(
        _matrix_table(
            f"{loaded.campaign.title} — audience (opted-out excluded)", districts, totals, matrix["by_district_segment"]
        )
    )
    out.print(Text.assemble("\n", ("audience by district and grid", "bold"), " (opted-out excluded)"))
    for d in districts:
        grids = matrix["by_district_grid"].get(d.id, {})
        listed = " · ".join(f"{g} {n}" for g, n in grids.items())
        out.print(f"{d.name} {totals[d.id]} in {len(grids)} grid(s): {listed}", markup=False)
    for v in variants:
        marker = " (this quarter)" if v["template"] == current else ""
        out.print(
            Text.assemble(
                "\n",
                (str(v["template"]), "bold"),
                f"{marker}: {v['encoding']}, {v['chars']} characters, {v['parts']} part(s)",
            )
        )
        for line in part_lines(str(v["text"])):  # where each part ends, as handsets and providers split it
            out.print(line, markup=False)
    out.print(f"\nrecipients {recipients}, opted out {report['opted_out']}, total parts {total_parts}")


# ------------------------------------------------------------------ runs


def _progress_follow(rt: Runtime, run_id: str, *, embedded: bool, show: bool) -> dict[str, Any]:
    """Poll the delivery log until the run has nothing open (or, embedded, the broker is idle)."""
    from .runs import status
    from .workers import start_worker, stop_worker, stub_idle

    worker = heartbeat = None
    if embedded:
        worker, heartbeat = start_worker(rt)
    try:
        st = status(rt, run_id)
        total = max(1, st["total"])
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not show,
            transient=False,
        ) as progress:
            task = progress.add_task(run_id, total=total)
            idle_since: float | None = None
            while True:
                if rt.fatal:
                    break
                st = status(rt, run_id)
                progress.update(task, completed=st["total"] - st["open"])
                if st["open"] == 0 or st["status"] in ("completed", "cancelled") or st["halted"]:
                    break
                if embedded:
                    # nothing queued and nothing in flight: what is still open waits on an operator (unknown rows)
                    if stub_idle(rt):
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since > 1.0:
                            break
                    else:
                        idle_since = None
                time.sleep(0.2)
    finally:
        if worker is not None and heartbeat is not None:
            stop_worker(rt, worker, heartbeat)
    if rt.fatal:
        # the delivery log cannot be written: say so once and stop; `resume` reconciles what is in flight
        raise StoreError(f"run {run_id} stopped: {rt.fatal}; when it is fixed, `dispatch resume {run_id}`")
    rt.store.finish_if_done(run_id)
    st = status(rt, run_id)
    if st["halted"]:
        raise StoreError(f"run {run_id} stopped: {st['halted']}; when it is fixed, `dispatch resume {run_id}`")
    return st


def _print_summary(st: dict[str, Any], console: SafeConsole = out) -> None:
    table = Table(title=f"run {st['run_id']} — {st['campaign_id']} ({st['status']})")
    states = [
        s
        for s in ("sent", "delivered", "failed", "skipped", "pending", "sending", "unknown", "expired", "cancelled")
        if any(s in v for v in st["by_district"].values())
    ]
    table.add_column("district")
    for s in states:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for district_id, counts in sorted(st["by_district"].items()):
        table.add_row(_district_name(district_id), *[str(counts.get(s, 0)) for s in states], str(sum(counts.values())))
    console.print(table)
    if st.get("as_of"):
        console.print(f"as of {st['as_of']} (theme {st['template']})", markup=False)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(st["counts"].items()))
    console.print(f"total {st['total']}: {counts}; parts sent {st['parts_sent']}", markup=False)
    if st.get("halted"):
        console.print(f"halted: {st['halted']}; `dispatch resume {st['run_id']}` continues it", markup=False)
    if st.get("stalled"):
        console.print(
            f"stalled: {st['stalled']} rows, last progress at {st['last_progress']}; "
            f"the scheduler's watchdog re-queues them, or `dispatch resume {st['run_id']}`",
            markup=False,
        )


@app.command()
def run(
    campaign: Path,
    dry_run: bool = typer.Option(False, "--dry-run", help="select and render, write and send nothing"),
    no_wait: bool = typer.Option(False, "--no-wait", help="with Redis: enqueue and return at once"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    as_of: str | None = typer.Option(
        None, "--as-of", help="ISO date(-time) in the campaign's time zone: theme as of then, recorded on the run"
    ),
    again: bool = typer.Option(False, "--again", help="run it again within its frequency period (needs --reason)"),
    reason: str | None = typer.Option(None, "--reason", help="why it is run again (kept in the ledger)"),
) -> None:
    """Create a run of CAMPAIGN and send it (embedded) or enqueue it for workers (Redis).

    Standard output is the run id alone (``RUN=$(dispatch run …)``), or one JSON object with
    ``--json``; progress and the summary go to standard error.
    """
    from .campaigns import check_run_date, load_campaign, parse_as_of
    from .runs import dry_run as do_dry_run
    from .runs import refuse_pointless_run, start_manual_run, status

    if again and not (reason or "").strip():
        raise UsageError("--again needs --reason TEXT: why this campaign is sent again", field="reason")
    rt = runtime()
    loaded = load_campaign(campaign, rt.settings.templates_dir, rt.clock())
    run_as_of = parse_as_of(as_of, loaded.campaign.zone()) if as_of else None
    check_run_date(loaded, rt.clock(), run_as_of)
    as_of_time = run_as_of.when if run_as_of else None
    if dry_run:
        summary: dict[str, Any] = {
            "campaign_id": loaded.campaign.id,
            "dry_run": True,
            "recipients": 0,
            "skipped": 0,
            "parts": 0,
            "by_district": {},
        }
        for row in do_dry_run(rt, loaded, as_of_time):
            bucket = summary["by_district"].setdefault(row.district, {"recipients": 0, "skipped": 0, "parts": 0})
            if row.skipped:
                summary["skipped"] += 1
                bucket["skipped"] += 1
            else:
                summary["recipients"] += 1
                summary["parts"] += row.parts
                bucket["recipients"] += 1
                bucket["parts"] += row.parts
        if as_json:
            emit_json(summary)
        else:
            for district_id, b in sorted(summary["by_district"].items()):
                out.print(
                    f"{_district_name(district_id)}: {b['recipients']} recipients, {b['parts']} parts, "
                    f"{b['skipped']} opted out"
                )
            out.print(
                f"dry run: {summary['recipients']} would be sent ({summary['parts']} parts), "
                f"{summary['skipped']} skipped; nothing written or sent"
            )
        return
    if not rt.settings.embedded:
        from .broker import ping

        ping(rt.broker)
    # a misconfigured gateway, a passed send_by or an empty audience is reported (exit 2) before any row is written
    _ = rt.ringback if loaded.campaign.channel == "ringback" else rt.gateway
    refuse_pointless_run(rt, loaded)
    rt.store, rt.actors  # noqa: B018 - open the delivery log and declare actors before timing the fan-out
    started = time.perf_counter()
    created = start_manual_run(rt, loaded, as_of=as_of_time, again_reason=reason.strip() if again and reason else None)
    fanout_seconds = time.perf_counter() - started
    enqueued_at = created.get("enqueue_started_at", time.time())
    if not as_json:
        sys.stdout.write(created["run_id"] + "\n")
        sys.stdout.flush()
        err.print(
            f"run {created['run_id']}: {created['pending']} to send in {created['batches']} batches", markup=False
        )
    deferred = _deferred_embedded(rt, created["run_id"])
    if (no_wait and not rt.settings.embedded) or deferred:
        st = status(rt, created["run_id"])
    else:
        st = _progress_follow(
            rt, created["run_id"], embedded=rt.settings.embedded, show=not as_json and sys.stderr.isatty()
        )
    if as_json:
        emit_json({**st, "fanout_seconds": round(fanout_seconds, 4), "enqueued_at": enqueued_at})
    else:
        _print_summary(st, err)
    if st["open"] and rt.settings.embedded:
        raise typer.Exit(1)


@app.command()
def runs(
    limit: int = typer.Option(50, help="newest first"),
    campaign: str | None = typer.Option(None, help="only this campaign id"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List runs, newest first."""
    rt = runtime()
    rows = rt.store.list_runs(limit=limit, campaign_id=campaign)
    keys = (
        "id",
        "campaign_id",
        "status",
        "fire_time",
        "created_at",
        "finished_at",
        "total",
        "template_name",
        "priority",
    )
    items = [
        {("run_id" if k == "id" else k): (r[k].isoformat() if hasattr(r[k], "isoformat") else r[k]) for k in keys}
        for r in rows
    ]
    if as_json:
        emit_json({"runs": items})
        return
    table = Table()
    for col in ("run", "campaign", "status", "total", "created", "template"):
        table.add_column(col)
    for item in items:
        table.add_row(
            item["run_id"],
            item["campaign_id"],
            item["status"],
            str(item["total"]),
            str(item["created_at"])[:19],
            item["template_name"],
        )
    out.print(table)


@app.command("status")
def status_cmd(
    run_id: str = typer.Argument(None, help="run id (default: the newest run)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A run's counts by state and by district (the newest run when no RUN_ID is given)."""
    from .runs import status

    rt = runtime()
    if run_id is None:
        newest = rt.store.list_runs(limit=1)
        if not newest:
            raise UsageError("no runs yet in this delivery log: `dispatch run CAMPAIGN` creates one", field="run")
        run_id = newest[0]["id"]
    st = status(rt, run_id)
    if as_json:
        emit_json(st)
    else:
        _print_summary(st)


@app.command()
def resume(
    run_id: str,
    no_wait: bool = typer.Option(False, "--no-wait", help="with Redis: enqueue and return at once"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Reconcile rows a crash left in flight and send what is still pending, nobody twice."""
    from .runs import resume_run, status

    rt = runtime()
    rt.store.get_run(run_id)
    result = resume_run(rt, run_id)
    if not as_json:
        err.print(
            f"resume {run_id}: {result['orphans']} orphaned in flight ({result['already_sent']} had been sent, "
            f"{result['requeued']} requeued); {result['batches']} batches enqueued",
            markup=False,
        )
    if (no_wait and not rt.settings.embedded) or _deferred_embedded(rt, run_id):
        st = status(rt, run_id)
    else:
        st = _progress_follow(rt, run_id, embedded=rt.settings.embedded, show=not as_json and sys.stderr.isatty())
    if as_json:
        emit_json({**st, "resume": result})
    else:
        _print_summary(st)
    waiting = _still_open(rt, run_id, st, result)
    if waiting and not (no_wait and not rt.settings.embedded):
        err.print(f"resume {run_id}: work is still open: {waiting}", markup=False)
        raise typer.Exit(1)


def _still_open(rt: Runtime, run_id: str, st: dict[str, Any], result: dict[str, Any]) -> str:
    """Why a resumed run is not done, for the operator ("" when nothing is open)."""
    if not st["open"]:
        return ""
    counts = st["counts"]
    parts = []
    if counts.get("sending"):
        holders = rt.store.sending_holders(run_id)
        who = ", ".join(f"{n} by {h}" for h, n in sorted(holders.items()))
        parts.append(
            f"{counts['sending']} rows in flight held by live workers ({who}); they are reconciled when "
            f"those workers record or are gone for {rt.settings.worker_stale_after}s: resume again then"
        )
    if counts.get("unknown"):
        parts.append(f"{counts['unknown']} rows unknown (the provider could not say): `dispatch settle {run_id}`")
    if counts.get("pending"):
        parts.append(f"{counts['pending']} rows pending (waiting for a retry, a worker or the send window)")
    if st.get("halted"):
        parts.append(f"halted: {st['halted']}")
    return "; ".join(parts)


@app.command()
def settle(
    run_id: str,
    as_state: str = typer.Option(..., "--as", help="sent, failed, or pending (send again)"),
    reason: str = typer.Option(..., "--reason", help="why: what the provider's records showed"),
    phone: list[str] = typer.Option(None, "--phone", help="only these numbers (default: every unknown row)"),
    by: str = typer.Option("", "--by", help="who decides (default: the login name)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Decide rows left `unknown` (a provider that cannot say whether it sent them), with a reason.

    Each row moved is a ledger event naming the operator and the reason; `--as pending` sends
    the rows again, so use it only when the provider's records show they never went out.
    """
    import getpass

    from .phones import InvalidPhone, normalise
    from .runs import resume_run, status

    if as_state not in ("sent", "failed", "pending"):
        raise UsageError(f"--as must be sent, failed or pending, got {as_state!r}", field="as")
    if not reason.strip():
        raise UsageError("give the reason for the decision", field="reason")
    rt = runtime()
    rt.store.get_run(run_id)
    keys = None
    if phone:
        try:
            keys = [f"{run_id}:{normalise(p)}" for p in phone]
        except InvalidPhone as exc:
            raise UsageError(str(exc), field="phone") from exc
    actor = by or getpass.getuser() or "operator"
    moved = rt.store.operator_settle(run_id, as_state, reason=reason.strip(), actor=f"operator:{actor}", keys=keys)
    if as_state == "pending" and moved:
        resume_run(rt, run_id)
        if rt.settings.embedded:  # no worker process will pick them up: send them here
            _progress_follow(rt, run_id, embedded=True, show=not as_json and sys.stderr.isatty())
    rt.store.finish_if_done(run_id)
    st = status(rt, run_id)
    if as_json:
        emit_json({**st, "settled": moved})
    else:
        err.print(f"settled {moved} unknown row(s) of {run_id} as {as_state}", markup=False)
        _print_summary(st)


@app.command()
def worker(
    queues: str | None = typer.Option(None, help="comma-separated queues (default: all)"),
    threads: int | None = typer.Option(None, help="worker threads (default DISPATCH_WORKER_THREADS)"),
) -> None:
    """Process batches from the Redis broker until SIGTERM/SIGINT."""
    from .workers import serve

    rt = runtime("INFO")
    if rt.settings.embedded:
        raise UsageError(
            "dispatch worker needs DISPATCH_BROKER_URL=redis://...; without it `dispatch run` sends in-process"
        )
    serve(rt, queues={q.strip() for q in queues.split(",") if q.strip()} if queues else None, threads=threads)


@app.command()
def web(
    host: str | None = typer.Option(None, help="address to bind (default DISPATCH_WEB_HOST or 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default DISPATCH_WEB_PORT, PORT or 8000)"),
) -> None:
    """Serve the web process: Twilio webhooks, delivery reports, ringback TwiML (uvicorn)."""
    import uvicorn

    from .web.app import create_app

    rt = runtime("INFO")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to die by it; a process
    # manager should see a clean stop (exit 0), so that re-raised signal (or one before uvicorn's
    # handlers are installed) ends the process normally
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if host:  # the address decides whether cookies must be Secure (settings.secure_cookies)
        rt.settings = rt.settings.with_(web_host=host)
    uvicorn.run(
        create_app(rt),
        host=rt.settings.web_host,
        port=port or rt.settings.web_port,
        # the level in force (DISPATCH_LOG_LEVEL or this command's INFO), never the raw, possibly empty, setting
        log_level=State.log_level.lower(),
        access_log=False,  # the access log would print callers' query strings; our handlers log masked
        # uvicorn's own logging config would add handlers that print tracebacks (SQL parameters, searched
        # numbers) unmasked; without it its records reach our root handler, which masks every line
        log_config=None,
    )


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


# ------------------------------------------------------------------ run control and the scheduler


def _deferred_embedded(rt: Runtime, run_id: str) -> bool:
    """On the embedded broker, a bulk run outside its send window cannot wait in this process:
    say so and leave it pending for `dispatch resume` (with Redis, workers defer it themselves)."""
    if not rt.settings.embedded:
        return False
    from .sender import context_from_run, window_opening

    opens_at = window_opening(rt, context_from_run(rt.store.get_run(run_id)))
    if opens_at is None:
        return False
    err.print(
        f"outside the send window: nothing is sent before {opens_at.isoformat()}; "
        f"then `dispatch resume {run_id}` sends it",
        markup=False,
    )
    return True


@app.command()
def pause(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop new sends of RUN on every worker within about a second; `dispatch resume RUN` continues."""
    from .runs import pause_run

    result = pause_run(runtime(), run_id)
    if as_json:
        emit_json(result)
    elif result["paused"]:
        err.print(f"paused {run_id}; `dispatch resume {run_id}` continues it", markup=False)
    else:
        err.print(f"{run_id} is {result['was']}, not running: nothing to pause", markup=False)


@app.command()
def cancel(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """End every row of RUN still pending as `cancelled` (what was sent stays sent)."""
    from .runs import cancel_run

    result = cancel_run(runtime(), run_id)
    if as_json:
        emit_json(result)
    else:
        err.print(f"cancelled {run_id}: {result['cancelled']} pending rows cancelled", markup=False)


@app.command()
def scheduler(
    campaigns: Path | None = typer.Option(None, "--campaigns", help="campaign folder (default: campaigns/)"),
) -> None:
    """Fire campaign schedules until SIGTERM; run several for failover (one leads at a time)."""
    from .scheduler import Scheduler

    rt = runtime("INFO")
    sched = Scheduler(rt, campaigns or rt.settings.campaigns_dir)
    sched.load(strict=True)
    if rt.settings.embedded:
        # no broker: the runs this process creates are sent by a worker inside it
        from .workers import start_worker, stop_worker

        worker, heartbeat = start_worker(rt)
        try:
            sched.serve()
        finally:
            stop_worker(rt, worker, heartbeat)
    else:
        sched.serve()


def _when(text: str | None, option: str) -> Any:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        message = f"expected an ISO date or date-time such as 2021-01-01, got {text!r}"
        raise UsageError(message, field=option) from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=ZoneInfo("Asia/Shanghai"))
    return value.astimezone(UTC)


@schedule_app.command("list")
def schedule_list(
    since: str | None = typer.Option(None, "--from", help="ISO date(-time), Shanghai time if no zone"),
    until: str | None = typer.Option(None, "--until", help="ISO date(-time), exclusive"),
    count: int = typer.Option(5, "--count", min=1, max=1000, help="fire times per campaign"),
    campaigns: Path | None = typer.Option(None, "--campaigns", help="folder of campaign files"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every scheduled campaign's next fire times (from now unless --from), with the template of each fire."""
    from .campaigns import check_paths
    from .scheduler import fire_times

    rt = runtime()
    loaded, errors = check_paths([campaigns or rt.settings.campaigns_dir], rt.settings.templates_dir, rt.clock())
    if errors:
        raise errors[0]
    start = _when(since, "--from") or rt.clock()
    end = _when(until, "--until")
    items: list[dict[str, Any]] = []
    for lc in loaded:
        schedule = lc.campaign.schedule
        if schedule is None:
            continue
        fires = [
            {"fire_time": ft.isoformat(), "template": lc.campaign.template_for(ft)}
            for ft in fire_times(schedule, start, end, count)
        ]
        items.append({
            "campaign_id": lc.campaign.id, "path": str(lc.path), "kind": schedule.kind, "timezone": schedule.timezone,
            "misfire_grace": schedule.misfire_grace, "priority": lc.campaign.priority, "fires": fires,
        })  # fmt: skip
    if as_json:
        emit_json({"campaigns": items})
        return
    if not items:
        out.print("no campaign has a schedule", markup=False)
    for item in items:
        out.print(f"{item['campaign_id']} ({item['kind']}, {item['timezone']}):", markup=False)
        for fire in item["fires"]:
            out.print(f"  {fire['fire_time']}  {fire['template']}", markup=False)


ringback_app = typer.Typer(no_args_is_help=True, help="Ringback-tone campaigns: restore numbers at the window's end.")
app.add_typer(ringback_app, name="ringback")


@ringback_app.command("restore")
def ringback_restore(
    run_id: str,
    no_wait: bool = typer.Option(False, "--no-wait", help="with Redis: enqueue and return at once"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Put back every number the ringback enrol run RUN_ID changed (also after a cancel). Idempotent."""
    from .ringback import start_restore
    from .runs import status

    rt = runtime()
    rt.ringback  # noqa: B018 - a misconfigured ringback adapter is reported (exit 2) before any row is written
    created = start_restore(rt, run_id)
    if not as_json:
        err.print(f"restore run {created['run_id']}: {created['total']} numbers", markup=False)
    if no_wait and not rt.settings.embedded:
        st = status(rt, created["run_id"])
    else:
        st = _progress_follow(
            rt, created["run_id"], embedded=rt.settings.embedded, show=not as_json and sys.stderr.isatty()
        )
    if as_json:
        emit_json(st)
    else:
        _print_summary(st)
    if st["open"] and rt.settings.embedded:
        raise typer.Exit(1)


@ringback_app.command("sweep")
def ringback_sweep(as_json: bool = typer.Option(False, "--json")) -> None:
    """Start the restore of every ringback enrol run whose window has ended (for cron or the scheduler)."""
    from .ringback import due_restores, start_restore

    rt = runtime()
    started = [start_restore(rt, run_id, actor="sweep") for run_id in due_restores(rt)]
    if as_json:
        emit_json({"restores": started})
    else:
        for item in started:
            out.print(f"restore run {item['run_id']}: {item['total']} numbers", markup=False)


# ------------------------------------------------------------------ audience


@audience_app.command("import")
def audience_import(file: Path, chunk: int = typer.Option(1000, help="rows per database write")) -> None:
    """Import residents from CSV: bad rows reported as file:line, good rows kept, deduplicated by phone."""
    from .audience import RowError, read_csv
    from .store import iter_chunks

    rt = runtime()
    if not file.is_file():
        raise UsageError("file not found", path=str(file))
    seen: set[str] = set()
    bad = dup = written = 0

    def good_rows(stream: Any) -> Any:
        nonlocal bad, dup
        for item in read_csv(file, stream):
            if isinstance(item, RowError):
                bad += 1
                err.print(str(item), markup=False)
                continue
            if item.phone in seen:
                dup += 1
                continue
            seen.add(item.phone)
            yield item

    try:
        with file.open(encoding="utf-8-sig", newline="", errors="surrogateescape") as stream:  # bad bytes: a row error
            for rows in iter_chunks(good_rows(stream), chunk):
                written += rt.store.upsert_residents(rows)
    except UnicodeDecodeError as exc:
        raise InputError("not UTF-8 text", path=str(file)) from exc
    out.print(
        f"imported {written} residents from {file} ({dup} duplicate phone rows merged, {bad} bad rows)", markup=False
    )
    if bad:
        raise typer.Exit(2)


@audience_app.command("generate")
def audience_generate(
    size: int = typer.Option(..., "--size", min=1, help="number of residents"),
    seed: int = typer.Option(1, "--seed"),
    output: Path | None = typer.Option(None, "--output", "-o", help="file to write (default: standard output)"),
) -> None:
    """Write a deterministic synthetic registry in the import format."""
    from .audience import generate, write_csv

    if output is None:
        write_csv(generate(size, seed), sys.stdout)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8", newline="") as fh:
        n = write_csv(generate(size, seed), fh)
    err.print(f"wrote {n} residents to {output}", markup=False)


@audience_app.command("stats")
def audience_stats(as_json: bool = typer.Option(False, "--json")) -> None:
    """Residents by district and population group."""
    stats = runtime().store.audience_stats()
    if as_json:
        emit_json(stats)
        return
    totals = {d.id: stats["by_district"].get(d.id, {}).get("residents", 0) for d in domain.DISTRICTS}
    opted = {d.id: stats["by_district"].get(d.id, {}).get("opted_out", 0) for d in domain.DISTRICTS}
    out.print(
        _matrix_table(
            "residents by district and group", list(domain.DISTRICTS), totals, stats["by_district_segment"], opted
        )
    )


def _matrix_table(
    title: str,
    districts: list[domain.District],
    totals: dict[str, int],
    cells: dict[str, dict[str, int]],
    opted_out: dict[str, int] | None = None,
) -> Table:
    """Groups down, districts across: six district columns fit a terminal, thirteen groups would not."""
    table = Table(title=title)
    table.add_column("group")
    for d in districts:
        table.add_column(d.name, justify="right")
    table.add_column("total", justify="right")
    table.add_row(
        Text("all residents", style="bold"), *[str(totals.get(d.id, 0)) for d in districts], str(sum(totals.values()))
    )
    if opted_out is not None:
        table.add_row("opted out", *[str(opted_out.get(d.id, 0)) for d in districts], str(sum(opted_out.values())))
    present = {s for c in cells.values() for s in c}
    for seg in domain.SEGMENTS:
        if seg.id not in present:
            continue
        row = [cells.get(d.id, {}).get(seg.id, 0) for d in districts]
        table.add_row(seg.id, *[str(n) for n in row], str(sum(row)))
    return table


# the auditors' commands (audit, report, users) register themselves on ``app``
from . import cli_audit  # noqa: E402, F401

# ------------------------------------------------------------------ entry point


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """The exception class ``name`` from click and from the click that typer vendors (they differ)."""
    classes: list[type[BaseException]] = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.17 ships its own click

        classes.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(classes)


# typer >= 0.17 defines its own Exit and Abort (not click's); accept both
_EXIT: tuple[type[BaseException], ...] = (*_click_classes("Exit"), cast("type[BaseException]", typer.Exit))
_ABORT: tuple[type[BaseException], ...] = (*_click_classes("Abort"), cast("type[BaseException]", typer.Abort))
_USAGE = _click_classes("ClickException")


def main(argv: list[str] | None = None) -> int:
    try:
        # with standalone_mode=False click returns the code of a typer.Exit instead of raising it
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int):
            return code
    except DispatchError as exc:
        # a store or send error quotes a driver's or provider's message, which can carry numbers and
        # credentials; input errors are our own "file:line: field: message" lines and stay as written
        err.print(str(exc) if isinstance(exc, InputError) else scrub(str(exc)), markup=False)
        return exc.exit_code
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 1))
    except _ABORT:
        err.print("aborted", markup=False)
        return 130
    except _USAGE as exc:
        # click's usage error (missing argument, unknown option, bad value), never a traceback
        exc.show()  # type: ignore[attr-defined]  # every ClickException has show(); the tuple type hides it
        return 2
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return 130
    except Exception as exc:  # the last line of defence: one line for the operator, details in the log
        logs.get_logger("dispatcher.cli").exception("internal_error")
        err.print(f"internal error: {type(exc).__name__}: {scrub(str(exc))}", markup=False)
        return 1
    finally:
        if State.runtime is not None:
            State.runtime.close()
            State.runtime = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
