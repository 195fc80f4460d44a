"""Restoring the numbers a ringback campaign changed, once its window has ended.

An enrol run's restore run is created once (found again by its reason), and re-enqueued
when asked again; ``due_restores`` lists the enrol runs whose window is over and that
have no restore run yet (for ``dispatch ringback sweep`` and the scheduler).
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from .batch import run_campaign
from .errors import UsageError
from .ringback import ENROL_CHANNEL, MAY_BE_ENROLLED, RESTORE_CHANNEL, restore_reason
from .runs import enqueue_batches
from .store import RunRecord, RunSpec

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.ringback")


def find_restore_run(runtime: Runtime, enrol_run_id: str) -> RunRecord | None:
    enrol = runtime.store.get_run(enrol_run_id)
    for run in runtime.store.list_runs(limit=500, campaign_id=enrol.campaign_id):
        if run.channel == RESTORE_CHANNEL and run.reason == restore_reason(enrol_run_id):
            return run
    return None


def start_restore(runtime: Runtime, enrol_run_id: str, *, actor: str = "operator") -> dict[str, Any]:
    """Create (once) and enqueue the restore run of an enrol run; returns its summary.

    Idempotent: a second call finds the restore run and re-enqueues whatever it still has pending.
    """
    store = runtime.store
    enrol = store.get_run(enrol_run_id)
    if enrol.channel != ENROL_CHANNEL:
        raise UsageError(f"run {enrol_run_id} is not a ringback enrolment (channel {enrol.channel})", field="run")
    existing = find_restore_run(runtime, enrol_run_id)
    if existing is not None:
        batches = store.pending_batches(existing.id)
        enqueue_batches(runtime, existing.id, batches)
        return {
            "run_id": existing.id,
            "total": existing.total,
            "batches": len(batches),
            "created": False,
        }
    now = runtime.clock()
    spec = RunSpec(
        run_id=f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}",
        campaign_id=enrol.campaign_id,
        title=enrol.title,
        owner=enrol.owner,
        channel=RESTORE_CHANNEL,
        priority=enrol.priority,
        reason=restore_reason(enrol_run_id),
        gateway=enrol.gateway,
        campaign_path=enrol.campaign_path,
        campaign_yaml=enrol.campaign_yaml,
        campaign_sha256=enrol.campaign_sha256,
        template_name=enrol.template_name,
        template_text=enrol.template_text,
        template_sha256=enrol.template_sha256,
        send_by=None,
        batch_size=enrol.batch_size,
        actor=actor,
    )
    created = store.create_restore_run(spec, enrol_run_id, MAY_BE_ENROLLED)
    with structlog.contextvars.bound_contextvars(run_id=spec.run_id, campaign_id=spec.campaign_id):
        enqueue_batches(runtime, spec.run_id, list(range(created.batches)))
        log.info("ringback.restore_created", restores=enrol_run_id, total=created.total)
    return {
        "run_id": created.run_id,
        "total": created.total,
        "pending": created.pending,
        "batches": created.batches,
        "created": True,
    }


def due_restores(runtime: Runtime, now: datetime | None = None) -> list[str]:
    """Enrol runs whose window has ended and that have no restore run yet (cancelled ones included)."""
    now = now or runtime.clock()
    due = []
    for run in runtime.store.list_runs(limit=500):
        if run.channel != ENROL_CHANNEL:
            continue
        window = run_campaign(run).window
        if window is not None and now >= window.end and find_restore_run(runtime, run.id) is None:
            due.append(run.id)
    return due
