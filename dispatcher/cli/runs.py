"""``dispatch run``, ``runs``, ``status``, ``resume``, ``settle``, ``reconcile``, ``pause``, ``cancel``."""

from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..actors import declared
from ..broker import ping
from ..campaigns import check_run_date, load_campaign, parse_as_of
from ..dlr import chase_run, human_seconds
from ..errors import UsageError
from ..follow import embedded_wait_until, follow_run
from ..runs import (
    RunStatus,
    cancel_run,
    dry_run_totals,
    pause_run,
    refuse_over_budget,
    refuse_pointless_run,
    resume_run,
    settle_keys,
    start_manual_run,
    status,
    why_still_open,
)
from ..runtime import Runtime
from ..term import SafeConsole
from .console import district_name, emit_json, err, out, runtime

#: the summary's columns, in the order a row moves through them (those with no rows are left out)
SUMMARY_STATES = (
    "sent", "delivered", "undelivered", "unconfirmed", "failed", "skipped", "pending", "sending", "unknown",
    "expired", "cancelled",
)  # fmt: skip


def progress_follow(rt: Runtime, run_id: str, *, embedded: bool, show: bool) -> RunStatus:
    """Wait for the run (``follow.follow_run``) with a progress bar on standard error when ``show``."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
        transient=False,
    ) as progress:
        task: list[Any] = []

        def on_progress(done: int, total: int) -> None:
            if not task:
                task.append(progress.add_task(run_id, total=max(1, total)))
            progress.update(task[0], completed=done)

        return follow_run(rt, run_id, embedded=embedded, on_progress=on_progress)


_CALL_HEAD = ("placed", "answered", "confirmed")


def print_summary(st: RunStatus, console: SafeConsole = out) -> None:
    table = Table(title=f"run {st.run_id} — {st.campaign_id} ({st.status})")
    states = [s for s in SUMMARY_STATES if any(s in v for v in st.by_district.values())]
    table.add_column("district")
    for s in states:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for district_id, counts in sorted(st.by_district.items()):
        table.add_row(district_name(district_id), *[str(counts.get(s, 0)) for s in states], str(sum(counts.values())))
    console.print(table)
    if st.as_of:
        console.print(f"as of {st.as_of.isoformat()} (theme {st.template})", markup=False)
    totals = ", ".join(f"{k} {v}" for k, v in sorted(st.counts.items()))
    console.print(f"total {st.total}: {totals}; parts sent {st.parts_sent}", markup=False)
    gateways = st.gateways
    if len(gateways.get("messages", {})) > 1 or gateways.get("refused"):
        taken = ", ".join(f"{name} {n}" for name, n in sorted(gateways["messages"].items()))
        console.print(f"messages per gateway: {taken}", markup=False)
        for name, codes in sorted(gateways["refused"].items()):
            why = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()))
            console.print(f"failover: {name} passed over {sum(codes.values())} times ({why})", markup=False)
        console.print(f"failover: {gateways['failed_over']} messages went out through a later gateway", markup=False)
    if st.calls:
        failed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in st.calls.items() if k not in _CALL_HEAD)
        console.print(
            f"calls: {st.calls['placed']} placed, {st.calls['answered']} answered, "
            f"{st.calls['confirmed']} confirmed (pressed 1)" + (f"; not reached: {failed}" if failed else ""),
            markup=False,
        )
    reports = st.delivery_reports
    if any(reports.values()):
        console.print(
            f"delivery reports: {reports['delivered']} delivered, {reports['undelivered']} undelivered, "
            f"{reports['unconfirmed']} unconfirmed (no final report by the deadline), "
            f"{reports['awaiting']} still awaited",
            markup=False,
        )
    if st.halted:
        console.print(f"halted: {st.halted}; `dispatch resume {st.run_id}` continues it", markup=False)
    if st.stalled:
        last = st.last_progress.isoformat() if st.last_progress else None
        console.print(
            f"stalled: {st.stalled} rows, last progress at {last}; "
            f"the scheduler's watchdog re-queues them, or `dispatch resume {st.run_id}`",
            markup=False,
        )


def deferred_embedded(rt: Runtime, run_id: str) -> bool:
    """On the embedded broker, a bulk run outside its send window cannot wait in this process:
    say so and leave it pending for `dispatch resume` (with Redis, workers defer it themselves)."""
    opens_at = embedded_wait_until(rt, run_id)
    if opens_at is None:
        return False
    err.print(
        f"outside the send window: nothing is sent before {opens_at.isoformat()}; "
        f"then `dispatch resume {run_id}` sends it",
        markup=False,
    )
    return True


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
    if again and not (reason or "").strip():
        raise UsageError("--again needs --reason TEXT: why this campaign is sent again", field="reason")
    rt = runtime()
    loaded = load_campaign(campaign, rt.settings.templates_dir, rt.clock(), gateways=rt.known_gateways())
    run_as_of = parse_as_of(as_of, loaded.campaign.zone()) if as_of else None
    check_run_date(loaded, rt.clock(), run_as_of)
    as_of_time = run_as_of.when if run_as_of else None
    if dry_run:
        totals = dry_run_totals(rt, loaded, as_of_time)
        if as_json:
            emit_json(totals.as_dict())
        else:
            costs = totals.district_costs()
            for district_id, b in sorted(totals.by_district.items()):
                out.print(
                    f"{district_name(district_id)}: {b['recipients']} recipients, {b['parts']} parts, "
                    f"{costs[district_id]:.2f} CNY, {b['skipped']} opted out"
                )
            out.print(
                f"dry run: {totals.recipients} would be sent ({totals.parts} parts, {totals.cost:.2f} CNY at "
                f"{totals.price_per_part:g} CNY a part), {totals.skipped} skipped; nothing written or sent"
            )
            if totals.budget is not None:
                verdict = "over" if totals.cost > totals.budget else "within"
                out.print(f"budget {totals.budget:g} CNY: {verdict} it")
        return
    if not rt.settings.embedded:
        ping(rt.broker)
    # a misconfigured gateway, a passed send_by or an empty audience is reported (exit 2) before any row is written
    _ = rt.ringback if loaded.campaign.channel == "ringback" else rt.gateway_for(loaded.campaign.gateways)
    refuse_pointless_run(rt, loaded)
    refuse_over_budget(rt, loaded, as_of_time)
    # open the delivery log and declare the actors before timing the fan-out
    rt.store  # noqa: B018
    declared(rt)
    started = time.perf_counter()
    created = start_manual_run(rt, loaded, as_of=as_of_time, again_reason=reason.strip() if again and reason else None)
    fanout_seconds = time.perf_counter() - started
    enqueued_at = created.enqueue_started_at or time.time()
    if not as_json:
        sys.stdout.write(created.run_id + "\n")
        sys.stdout.flush()
        err.print(f"run {created.run_id}: {created.pending} to send in {created.batches} batches", markup=False)
    deferred = deferred_embedded(rt, created.run_id)
    if (no_wait and not rt.settings.embedded) or deferred:
        st = status(rt, created.run_id)
    else:
        st = progress_follow(
            rt, created.run_id, embedded=rt.settings.embedded, show=not as_json and sys.stderr.isatty()
        )
    if as_json:
        emit_json({**st.to_json(), "fanout_seconds": round(fanout_seconds, 4), "enqueued_at": enqueued_at})
    else:
        print_summary(st, err)
    if st.open and rt.settings.embedded:
        raise typer.Exit(1)


def _json_value(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


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
    items = [{("run_id" if k == "id" else k): _json_value(getattr(r, k)) for k in keys} for r in rows]
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


def status_cmd(
    run_id: str = typer.Argument(None, help="run id (default: the newest run)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A run's counts by state and by district (the newest run when no RUN_ID is given)."""
    rt = runtime()
    if run_id is None:
        newest = rt.store.list_runs(limit=1)
        if not newest:
            raise UsageError("no runs yet in this delivery log: `dispatch run CAMPAIGN` creates one", field="run")
        run_id = newest[0].id
    st = status(rt, run_id)
    if as_json:
        emit_json(st.to_json())
    else:
        print_summary(st)


def resume(
    run_id: str,
    no_wait: bool = typer.Option(False, "--no-wait", help="with Redis: enqueue and return at once"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Reconcile rows a crash left in flight and send what is still pending, nobody twice."""
    rt = runtime()
    rt.store.get_run(run_id)
    result = resume_run(rt, run_id)
    if not as_json:
        err.print(
            f"resume {run_id}: {result['orphans']} orphaned in flight ({result['already_sent']} had been sent, "
            f"{result['requeued']} requeued); {result['batches']} batches enqueued",
            markup=False,
        )
    if (no_wait and not rt.settings.embedded) or deferred_embedded(rt, run_id):
        st = status(rt, run_id)
    else:
        st = progress_follow(rt, run_id, embedded=rt.settings.embedded, show=not as_json and sys.stderr.isatty())
    if as_json:
        emit_json({**st.to_json(), "resume": result})
    else:
        print_summary(st)
    waiting = why_still_open(rt, run_id, st)
    if waiting and not (no_wait and not rt.settings.embedded):
        err.print(f"resume {run_id}: work is still open: {waiting}", markup=False)
        raise typer.Exit(1)


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
    if as_state not in ("sent", "failed", "pending"):
        raise UsageError(f"--as must be sent, failed or pending, got {as_state!r}", field="as")
    if not reason.strip():
        raise UsageError("give the reason for the decision", field="reason")
    rt = runtime()
    rt.store.get_run(run_id)
    keys = settle_keys(run_id, phone) if phone else None
    actor = by or getpass.getuser() or "operator"
    moved = rt.store.operator_settle(run_id, as_state, reason=reason.strip(), actor=f"operator:{actor}", keys=keys)
    if as_state == "pending" and moved:
        resume_run(rt, run_id)
        if rt.settings.embedded:  # no worker process will pick them up: send them here
            progress_follow(rt, run_id, embedded=True, show=not as_json and sys.stderr.isatty())
    rt.store.finish_if_done(run_id)
    st = status(rt, run_id)
    if as_json:
        emit_json({**st.to_json(), "settled": moved})
    else:
        err.print(f"settled {moved} unknown row(s) of {run_id} as {as_state}", markup=False)
        print_summary(st)


def reconcile(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Chase RUN's delivery reports: ask the provider about rows still `sent` after
    DISPATCH_DLR_CHASE_AFTER, and mark those past DISPATCH_DLR_DEADLINE `unconfirmed`."""
    rt = runtime()
    rt.store.get_run(run_id)
    result = chase_run(rt, run_id, actor=f"operator:{getpass.getuser() or 'operator'}")
    if as_json:
        emit_json(result.as_dict())
        return
    settings = rt.settings
    if result.can_fetch_status:
        asked = (
            f"asked {result.gateway} about {result.asked} rows sent over {human_seconds(settings.dlr_chase_after)} "
            f"ago: {result.delivered} delivered, {result.undelivered} undelivered, {result.failed} failed, "
            f"{result.no_final_status} with no final status yet, {result.asked - result.answered} unknown to it"
        )
    else:
        asked = f"{result.gateway} cannot be asked for a message's status: rows wait for their report or the deadline"
    out.print(f"reconcile {run_id}: {asked}", markup=False)
    if result.error:
        err.print(f"reconcile {run_id}: asking stopped early: {result.error}", markup=False)
    now = result.now
    out.print(
        f"{result.unconfirmed} marked unconfirmed (no final report within {human_seconds(settings.dlr_deadline)}); "
        f"now {now['delivered']} delivered, {now['undelivered']} undelivered, {now['unconfirmed']} unconfirmed, "
        f"{now['sent']} sent awaiting a report",
        markup=False,
    )
    if result.error:
        raise typer.Exit(1)


def pause(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop new sends of RUN on every worker within about a second; `dispatch resume RUN` continues."""
    result = pause_run(runtime(), run_id)
    if as_json:
        emit_json(result)
    elif result["paused"]:
        err.print(f"paused {run_id}; `dispatch resume {run_id}` continues it", markup=False)
    else:
        err.print(f"{run_id} is {result['was']}, not running: nothing to pause", markup=False)


def cancel(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """End every row of RUN still pending as `cancelled` (what was sent stays sent)."""
    result = cancel_run(runtime(), run_id)
    if as_json:
        emit_json(result)
    else:
        err.print(f"cancelled {run_id}: {result['cancelled']} pending rows cancelled", markup=False)
