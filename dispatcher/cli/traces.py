"""``dispatch trace`` and ``dispatch purge``: per-attempt HTTP traces for operators, and their retention.

The logic lives in traces.py; this module only parses options and prints.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import typer

from .. import traces
from ..audit import LOCAL_TZ
from ..errors import UsageError
from .audit import _who
from .console import emit_json, out, runtime


def trace(
    run_id: str = typer.Argument(..., help="run id (see `dispatch runs`)"),
    phone: str = typer.Option(..., "--phone", help="the person's number (shown masked; the lookup is recorded)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every attempt for one person in a run: state change, error code and HTTP exchange, redacted as stored."""
    number = traces.parse_phone(phone)  # a malformed number fails before the delivery log is opened
    found = traces.delivery_trace(runtime().store, run_id, phone=number, actor=_who(), via="cli")
    if as_json:
        emit_json(found)
        return
    _print_trace(found)


def purge(
    traces_older_than: str | None = typer.Option(
        None, "--traces-older-than", help="e.g. 30d, 12w (default: DISPATCH_TRACE_RETENTION, 30d)"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Clear the HTTP trace text of attempts older than a period; attempts and the ledger stay (and verify)."""
    rt = runtime()
    if traces_older_than is not None and not traces_older_than.strip():
        raise UsageError("give a period such as 30d", field="traces-older-than")
    done = traces.purge(rt.store, traces_older_than, default=rt.settings.trace_retention, actor=_who(), via="cli")
    if as_json:
        emit_json({"older_than": done.older_than, "before": done.before.isoformat(), "attempts": done.attempts})
        return
    out.print(
        f"cleared the traces of {done.attempts} attempt(s) made before {_local(done.before.isoformat())} "
        f"(older than {done.older_than}); recorded in the audit chain",
        markup=False,
    )


def _local(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(LOCAL_TZ).strftime("%Y-%m-%d %H:%M:%S")


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _print_trace(d: dict[str, Any]) -> None:
    say = lambda text: out.print(text, markup=False)  # noqa: E731 - every line is plain text from the log
    say(
        f"run {d['run_id']}  phone {d['phone']}  state {d['state']}  gateway {d['gateway'] or '-'}  "
        f"provider id {d['provider_id'] or '-'}  error {d['error_code'] or '-'}  (times Asia/Shanghai)"
    )
    if not d["attempts"]:
        say("no attempts: nothing was handed to a gateway for this person")
    for a in d["attempts"]:
        change = f"{a['from_state'] or '?'}→{a['to_state'] or '?'}"
        say(
            f"attempt {a['attempt']}  {_local(a['at'])}  {a['gateway']}  {change}  outcome {a['outcome']}  "
            f"error {a['error_code'] or '-'}" + (f" ({a['error_message']})" if a["error_message"] else "")
        )
        if a["trace"] == traces.PURGED:
            say(f"  trace purged at {_local(a['trace_purged_at'])} (retention)")
        elif a["trace"] == traces.NONE:
            say("  no HTTP exchange recorded")
        for x in a["exchanges"]:
            if "raw" in x:
                say(f"  {_compact(x['raw'])}")
                continue
            result = x.get("status") if x.get("status") is not None else x.get("error", "no answer")
            say(f"  {x.get('method')} {x.get('url')} -> {result} in {x.get('elapsed_ms')} ms")
            for name, label in (("request_headers", "request headers"), ("request", "request body"),
                                ("response", "response body")):  # fmt: skip
                if x.get(name) is not None:
                    say(f"    {label}: {_compact(x[name])}")
    if d["events"]:
        say("ledger events of this person (state history, delivery reports included):")
        for e in d["events"]:
            say(
                f"  {_local(e['at'])}  {e['from_state'] or '-'}→{e['to_state'] or '-'}  by {e['actor']}"
                + (f"  error {e['error_code']}" if e["error_code"] else "")
                + (f"  reason {e['reason']}" if e["reason"] else "")
            )
