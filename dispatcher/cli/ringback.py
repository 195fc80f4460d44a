"""``dispatch ringback restore`` and ``sweep``: putting numbers back at a ringback window's end."""

from __future__ import annotations

import sys

import typer

from ..restores import due_restores, start_restore
from ..runs import status
from .console import emit_json, err, out, runtime
from .runs import print_summary, progress_follow

ringback_app = typer.Typer(no_args_is_help=True, help="Ringback-tone campaigns: restore numbers at the window's end.")


@ringback_app.command("restore")
def ringback_restore(
    run_id: str,
    no_wait: bool = typer.Option(False, "--no-wait", help="with Redis: enqueue and return at once"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Put back every number the ringback enrol run RUN_ID changed (also after a cancel). Idempotent."""
    rt = runtime()
    rt.ringback  # noqa: B018 - a misconfigured ringback adapter is reported (exit 2) before any row is written
    created = start_restore(rt, run_id)
    if not as_json:
        err.print(f"restore run {created['run_id']}: {created['total']} numbers", markup=False)
    if no_wait and not rt.settings.embedded:
        st = status(rt, created["run_id"])
    else:
        st = progress_follow(
            rt, created["run_id"], embedded=rt.settings.embedded, show=not as_json and sys.stderr.isatty()
        )
    if as_json:
        emit_json(st.to_json())
    else:
        print_summary(st)
    if st.open and rt.settings.embedded:
        raise typer.Exit(1)


@ringback_app.command("sweep")
def ringback_sweep(as_json: bool = typer.Option(False, "--json")) -> None:
    """Start the restore of every ringback enrol run whose window has ended (for cron or the scheduler)."""
    rt = runtime()
    started = [start_restore(rt, run_id, actor="sweep") for run_id in due_restores(rt)]
    if as_json:
        emit_json({"restores": started})
    else:
        for item in started:
            out.print(f"restore run {item['run_id']}: {item['total']} numbers", markup=False)
