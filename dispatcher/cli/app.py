"""The ``dispatch`` command line: the typer app, every command group registered on it, and ``main``.

Exit codes: 0 ok, 1 runtime failure, 2 bad input. Every ``InputError`` is printed
as one line (``path:line:column: field: message``) with no traceback, before
anything is written or sent.

Each command group lives in its own module (campaigns, runs, processes, ringback,
audience, audit, traces, reports, users, alerts, approvals) and only parses options and prints; the work is
done by the pipeline modules they call. This module is the one place that puts
them together: the order below is the order ``dispatch --help`` lists them in.
"""

from __future__ import annotations

import gc
from typing import cast

import click
import typer

from .. import logs
from ..errors import DispatchError, InputError
from ..redact import scrub
from . import alerts, approvals, audience, audit, campaigns, processes, reports, ringback, runs, traces, users
from .console import State, err

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Anti-fraud SMS campaign dispatcher.",
)
app.add_typer(audience.audience_app, name="audience")
app.add_typer(campaigns.schedule_app, name="schedule")
app.command("validate")(campaigns.validate)
app.command("preview")(campaigns.preview)
app.command("submit")(approvals.submit)
app.command("approve")(approvals.approve)
app.command("approvals")(approvals.approvals_cmd)
app.command("run")(runs.run)
app.command("runs")(runs.runs)
app.command("status")(runs.status_cmd)
app.command("resume")(runs.resume)
app.command("settle")(runs.settle)
app.command("reconcile")(runs.reconcile)
app.command("worker")(processes.worker)
app.command("web")(processes.web)
app.command("pause")(runs.pause)
app.command("cancel")(runs.cancel)
app.command("scheduler")(processes.scheduler)
app.add_typer(ringback.ringback_app, name="ringback")
app.add_typer(audit.audit_app, name="audit")
app.command("trace")(traces.trace)
app.command("purge")(traces.purge)
app.add_typer(reports.report_app, name="report")
app.add_typer(users.users_app, name="users")
app.add_typer(alerts.alert_app, name="alert")
app.command("alerts")(alerts.alerts_list)
app.add_typer(alerts.roster_app, name="roster")
app.add_typer(alerts.apikeys_app, name="apikeys")
reports.report_app.command("alerts")(alerts.report_alerts)


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
    # what importing the package built (SQLAlchemy's and pydantic's structures, the CLI's) lives until the
    # process ends: frozen, it is walked by none of the command's collections nor by the one at exit, which
    # took a quarter of a short command's time (0.15 of 0.62 s for `dispatch runs`)
    gc.freeze()
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
