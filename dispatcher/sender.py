"""Sending one batch: claim its pending rows, render, hand to the gateway, record every result.

This is the plain function the ``send_batch`` actor wraps. It is safe to run
twice for the same batch (Dramatiq delivers at least once): the claim takes only
rows still ``pending``, so a second delivery of the message finds nothing to do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
import yaml

from .campaigns import Campaign
from .errors import AmbiguousSendError, PermanentSendError, RetryableSendError, SendError, TemplateError
from .gateways.base import OutgoingMessage, SendResult
from .store.base import EXPIRED, FAILED, PENDING, SENT, SKIPPED, UNKNOWN, Claimed, Outcome
from .templates import Composer, TemplateSource

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.sender")


@dataclass(frozen=True)
class RunContext:
    """What a worker needs to render a run's messages, rebuilt from the run's snapshot."""

    run_id: str
    campaign_id: str
    priority: str
    send_by: datetime | None
    composer: Composer
    status: str


def context_from_run(run: dict[str, Any]) -> RunContext:
    campaign = Campaign.model_validate(yaml.safe_load(run["campaign_yaml"]))
    owner = campaign.owner_department()
    composer = Composer(
        source=TemplateSource(name=run["template_name"], text=run["template_text"]),
        signature=campaign.signature,
        opt_out_text=campaign.opt_out_text,
        variables=campaign.variables,
        campaign={"id": campaign.id, "title": campaign.title, "owner": owner.name if owner else campaign.owner},
    )
    return RunContext(
        run_id=run["id"],
        campaign_id=run["campaign_id"],
        priority=run["priority"],
        send_by=run["send_by"],
        composer=composer,
        status=run["status"],
    )


class RunCache:
    """Per-process cache of rendered-run contexts: the snapshot never changes after creation."""

    def __init__(self) -> None:
        self._items: dict[str, RunContext] = {}

    def get(self, runtime: Runtime, run_id: str) -> RunContext:
        context = self._items.get(run_id)
        if context is None:
            context = context_from_run(runtime.store.get_run(run_id))
            if len(self._items) > 64:
                self._items.clear()
            self._items[run_id] = context
        return context


RUNS = RunCache()


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before the next try: the provider's hint, else capped exponential with jitter."""
    if retry_after is not None:
        return max(0.5, retry_after)
    return min(60.0, 2.0 ** max(0, attempt - 1)) * random.uniform(0.8, 1.2)


def _outcome_for(
    row: Claimed, message: OutgoingMessage, result: SendResult | SendError, gateway: str, now: datetime, max_attempts: int
) -> Outcome:
    common: dict[str, Any] = {
        "id": row.id,
        "run_id": row.run_id,
        "attempt": row.attempts,
        "gateway": gateway,
        "parts": message.parts,
        "encoding": message.encoding,
        "body": message.body,
    }
    if isinstance(result, SendResult):
        return Outcome(state=SENT, outcome="sent", provider_id=result.provider_id, trace=result.trace, **common)
    trace = getattr(result, "trace", None) or []
    if isinstance(result, AmbiguousSendError):
        return Outcome(state=UNKNOWN, outcome="unknown", error_code=result.code, error_message=result.message, trace=trace, **common)
    if isinstance(result, RetryableSendError) or (result.retryable and not isinstance(result, PermanentSendError)):
        if row.attempts < max_attempts:
            delay = backoff(row.attempts, getattr(result, "retry_after", None))
            return Outcome(
                state=PENDING,
                outcome="retry",
                error_code=result.code,
                error_message=result.message,
                next_attempt_at=now + timedelta(seconds=delay),
                trace=trace,
                **common,
            )
        return Outcome(
            state=FAILED, outcome="failed", error_code=result.code, reason="attempts_exhausted",
            error_message=result.message, trace=trace, **common,
        )  # fmt: skip
    opt_out = row.phone if isinstance(result, PermanentSendError) and result.opt_out else None
    return Outcome(
        state=FAILED, outcome="failed", error_code=result.code, error_message=result.message,
        opt_out_phone=opt_out, trace=trace, **common,
    )  # fmt: skip


def send_rows(runtime: Runtime, context: RunContext, rows: list[Claimed]) -> list[Outcome]:
    """Render and send already-claimed rows; returns the outcomes (not yet recorded)."""
    now = runtime.clock()
    gateway = runtime.gateway
    outcomes: list[Outcome] = []
    to_send: list[tuple[Claimed, OutgoingMessage]] = []
    for row in rows:
        skip_reason = None
        if row.opted_out:
            skip_reason = "opted_out"
        if skip_reason:
            outcomes.append(Outcome(id=row.id, run_id=row.run_id, state=SKIPPED, attempt=row.attempts, gateway=gateway.name, outcome="skipped", reason=skip_reason))
            continue
        if context.send_by is not None and now > context.send_by:
            outcomes.append(Outcome(id=row.id, run_id=row.run_id, state=EXPIRED, attempt=row.attempts, gateway=gateway.name, outcome="skipped", reason="send_by_passed"))
            continue
        try:
            body, seg = context.composer.render({"name": row.name, "district": row.district, "grid": row.grid})
        except TemplateError as exc:
            outcomes.append(Outcome(id=row.id, run_id=row.run_id, state=FAILED, attempt=row.attempts, gateway=gateway.name, outcome="failed", error_code="template.render", error_message=exc.message))
            continue
        to_send.append(
            (
                row,
                OutgoingMessage(
                    key=row.key,
                    run_id=row.run_id,
                    campaign_id=context.campaign_id,
                    to=row.phone,
                    body=body,
                    parts=seg.parts,
                    encoding=seg.encoding,
                    send_by=context.send_by,
                    priority=context.priority,
                ),
            )
        )
    if to_send:
        results = gateway.send_many([m for _, m in to_send])
        for (row, message), result in zip(to_send, results, strict=True):
            outcomes.append(_outcome_for(row, message, result, gateway.name, now, runtime.settings.max_attempts))
    return outcomes


@dataclass(frozen=True)
class BatchResult:
    claimed: int
    counts: dict[str, int]
    retry_in: float | None


def process_batch(runtime: Runtime, run_id: str, batch_no: int) -> BatchResult:
    """Send what is pending in one batch of one run and record it; return when to retry, if needed."""
    store = runtime.store
    context = RUNS.get(runtime, run_id)
    status = store.get_run(run_id)["status"]
    if status in ("cancelled", "completed"):
        return BatchResult(0, {}, None)
    with structlog.contextvars.bound_contextvars(run_id=run_id, campaign_id=context.campaign_id, batch=batch_no):
        rows = store.claim(run_id, batch_no, runtime.worker_id)
        if not rows:
            log.debug("batch.nothing_to_claim")
            retry_at = store.next_retry_at(run_id, batch_no)
            return BatchResult(0, {}, _seconds_until(runtime, retry_at))
        try:
            outcomes = send_rows(runtime, context, rows)
        except BaseException:
            # an unexpected failure before anything was handed over must not strand the claim;
            # rows the gateway may have taken stay in `sending` for resume to reconcile
            log.exception("batch.crashed", claimed=len(rows))
            raise
        store.record(outcomes)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        log.info("batch.done", claimed=len(rows), **counts)
        retry_at = store.next_retry_at(run_id, batch_no) if counts.get("retry") else None
        store.finish_if_done(run_id)
        return BatchResult(len(rows), counts, _seconds_until(runtime, retry_at))


def _seconds_until(runtime: Runtime, when: datetime | None) -> float | None:
    if when is None:
        return None
    return max(0.0, (when - runtime.clock()).total_seconds())
