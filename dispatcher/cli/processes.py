"""``dispatch worker``, ``dispatch web`` and ``dispatch scheduler``: the long-running processes."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import UsageError
from ..scheduler import Scheduler
from ..workers import serve, start_worker, stop_worker
from .console import State, runtime

if TYPE_CHECKING:
    from ..runtime import Runtime


_METRICS_HELP = "serve Prometheus metrics on this port (default DISPATCH_METRICS_PORT; 0 = none)"


def _serve_metrics(rt: Runtime, port: int | None) -> None:
    """Start this process's exporter when a port is configured; a port in use is a one-line error."""
    port = rt.settings.metrics_port if port is None else port
    if not port:
        return
    from .. import metrics

    try:
        metrics.serve(rt.settings.metrics_host, port)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {rt.settings.metrics_host}:{port}: {exc.strerror or exc}") from exc


def worker(
    queues: str | None = typer.Option(None, help="comma-separated queues (default: all)"),
    threads: int | None = typer.Option(None, help="worker threads (default DISPATCH_WORKER_THREADS)"),
    metrics_port: int | None = typer.Option(None, min=0, max=65535, help=_METRICS_HELP),
) -> None:
    """Process batches from the Redis or RabbitMQ broker until SIGTERM/SIGINT."""
    rt = runtime("INFO")
    if rt.settings.embedded:
        raise UsageError(
            "dispatch worker needs DISPATCH_BROKER_URL=redis://... or amqp://...; "
            "without it `dispatch run` sends in-process"
        )
    _serve_metrics(rt, metrics_port)
    serve(rt, queues={q.strip() for q in queues.split(",") if q.strip()} if queues else None, threads=threads)


def web(
    host: str | None = typer.Option(None, help="address to bind (default DISPATCH_WEB_HOST or 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default DISPATCH_WEB_PORT, PORT or 8000)"),
) -> None:
    """Serve the web process: Twilio webhooks, delivery reports, ringback TwiML (uvicorn)."""
    # the web stack (uvicorn, starlette, the dashboard's templates) is loaded by this command only:
    # every other command starts without it
    import uvicorn

    from ..web.app import create_app

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


def scheduler(
    campaigns: Path | None = typer.Option(None, "--campaigns", help="campaign folder (default: campaigns/)"),
    metrics_port: int | None = typer.Option(None, min=0, max=65535, help=_METRICS_HELP),
) -> None:
    """Fire campaign schedules until SIGTERM; run several for failover (one leads at a time)."""
    rt = runtime("INFO")
    sched = Scheduler(rt, campaigns or rt.settings.campaigns_dir)
    sched.load(strict=True)
    _serve_metrics(rt, metrics_port)
    if rt.settings.embedded:
        # no broker: the runs this process creates are sent by a worker inside it
        worker, heartbeat = start_worker(rt)
        try:
            sched.serve()
        finally:
            stop_worker(rt, worker, heartbeat)
    else:
        sched.serve()
