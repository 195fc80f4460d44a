"""Ringback-tone campaigns: enrol every eligible number for the window, restore every one at its end.

A ringback campaign (``channel: ringback``, ``window: {start, end}``) runs through the
same delivery log as SMS: ``dispatch run`` creates the *enrol* run (one row per
resident, opted-out people ``skipped``), and its batches are processed here instead
of by the SMS sender (``sender.process_batch`` hands them over). At the window's end
``restore`` creates a *restore* run (channel ``ringback-restore``) whose rows are
every number the enrol run may have changed, and processes it the same way. So both
steps get the same claims, retries with backoff, ``unknown`` on ambiguous replies,
per-attempt traces, ledger events and idempotency keys as a send.

Rules:
- a number opted out is never enrolled (checked at run creation and again at claim);
- enrolment does not start before the window and never retries past its end;
- restore does not depend on the enrol run's status: a cancelled campaign is restored too,
  and restoring is retried until the attempts are exhausted (then the row fails, visibly).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from . import metrics
from .batch import RUNS, BatchResult, outcome_for, seconds_until
from .errors import SendError
from .providers.base import OutgoingMessage, RingbackRequest, RingbackResult, SendResult
from .store import DELIVERED, EXPIRED, SENDING, SENT, SKIPPED, UNKNOWN, Outcome

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.ringback")

ENROL_CHANNEL = "ringback"
RESTORE_CHANNEL = "ringback-restore"
#: enrol-run states whose number may have been changed and so must be restored
MAY_BE_ENROLLED = (SENT, DELIVERED, UNKNOWN, SENDING)
_NOBODY = {"name": "", "district": "", "grid": ""}


def announcement_text(context: Any) -> str:
    """The warning callers hear: who speaks and the campaign's text, without brackets or the SMS opt-out."""
    composer = context.composer
    return composer.signature.strip("【】") + "提醒您：" + composer.body(_NOBODY)


def restore_reason(enrol_run_id: str) -> str:
    """The reason recorded on the restore run of an enrol run: how the restore run is found again."""
    return f"restore of {enrol_run_id}"


def process_ringback_batch(runtime: Runtime, run_id: str, batch_no: int) -> BatchResult:
    """Enrol or restore the pending rows of one batch; record every attempt like a send."""
    store = runtime.store
    run = store.get_run(run_id)
    restoring = run.channel == RESTORE_CHANNEL
    context = RUNS.get(runtime, run_id)
    campaign = context.campaign
    assert campaign is not None and campaign.window is not None
    window = campaign.window
    if run.status in ("cancelled", "completed"):
        return BatchResult(0, {}, None)
    with structlog.contextvars.bound_contextvars(run_id=run_id, campaign_id=context.campaign_id, batch=batch_no):
        now = runtime.clock()
        if run.status == "paused":
            return BatchResult(0, {"parked": 1}, None)
        if not restoring and now < window.start:
            log.info("ringback.deferred", opens_at=window.start.isoformat())
            delay = min(runtime.settings.window_recheck, max(0.05, (window.start - now).total_seconds()))
            return BatchResult(0, {"deferred": 1}, delay)
        started = time.monotonic()
        rows = store.claim(run_id, batch_no, runtime.worker_id)
        if not rows:
            return BatchResult(0, {}, seconds_until(runtime, store.next_retry_at(run_id, batch_no)))
        adapter = runtime.ringback
        enrol_run_id = (run.reason or "").removeprefix("restore of ") if restoring else run_id
        text = announcement_text(context)
        outcomes: list[Outcome] = []
        for row in rows:
            common: dict[str, Any] = {
                "id": row.id,
                "key": row.key,
                "run_id": row.run_id,
                "claim_token": row.claim_token,
                "attempt": row.attempts,
                "gateway": adapter.name,
            }
            if not restoring and row.opted_out:
                outcomes.append(Outcome(state=SKIPPED, outcome="skipped", reason="opted_out", **common))
                continue
            if not restoring and now >= window.end:
                outcomes.append(Outcome(state=EXPIRED, outcome="skipped", reason="window_ended", **common))
                continue
            request = RingbackRequest(
                key=row.key,
                run_id=row.run_id,
                campaign_id=context.campaign_id,
                phone=row.phone,
                text=text,
                start=window.start,
                end=window.end,
                kept=store.ringback_kept(enrol_run_id, row.phone) if restoring else None,
            )
            result: SendResult | SendError
            try:
                done: RingbackResult = adapter.restore(request) if restoring else adapter.enrol(request)
            except SendError as exc:
                result = exc
            else:
                if not restoring:
                    store.keep_ringback(run_id, row.phone, done.provider_id, done.kept)
                result = SendResult(
                    provider_id=done.provider_id,
                    status="restored" if restoring else "enrolled",
                    trace=done.trace,
                )
            message = OutgoingMessage(
                key=row.key,
                run_id=row.run_id,
                campaign_id=context.campaign_id,
                to=row.phone,
                body=text,
                parts=1,
                encoding="voice",
                send_by=None if restoring else window.end,
                priority=context.priority,
            )
            outcomes.append(
                outcome_for(row, message, result, adapter.name, runtime.clock(), runtime.settings.max_attempts)
            )
        store.record(outcomes)
        kind = RESTORE_CHANNEL if restoring else ENROL_CHANNEL
        metrics.batch_done(outcomes, lane=context.priority, campaign=context.campaign_id, channel=kind, started=started)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        log.info("ringback.batch_done", action="restore" if restoring else "enrol", claimed=len(rows), **counts)
        retry_at = store.next_retry_at(run_id, batch_no) if counts.get("retry") else None
        store.finish_if_done(run_id)
        return BatchResult(len(rows), counts, seconds_until(runtime, retry_at))
