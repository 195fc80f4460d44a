"""What every batch of a run shares, whatever its channel: the run's context, the result, the outcome of a send.

The one batch skeleton (sender.py) and the channels it is given (channels.py: SMS, voice,
ringback enrol and restore) build on these, so neither has to import the other's internals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from .campaigns import Campaign, campaign_snapshot
from .errors import AmbiguousSendError, PermanentSendError, RetryableSendError, SendError
from .phones import mask_text
from .providers.base import OutgoingMessage, SendResult
from .store import EXPIRED, FAILED, PENDING, SENT, UNKNOWN, Claimed, Outcome, RunRecord
from .templates import Composer, TemplateSource

if TYPE_CHECKING:
    from .runtime import Runtime

# a refused send is one of the sender's events: operators filter the log on this name
log = structlog.get_logger("dispatcher.sender")


def run_campaign(run: RunRecord) -> Campaign:
    """The campaign a run was created with, parsed once per process (see ``campaigns.campaign_snapshot``)."""
    return campaign_snapshot(run.id, run.campaign_sha256, run.campaign_yaml)


#: the provider whose sends are drills (lines in a local file): runs on it need no approval
DRILL_GATEWAY = "outbox"
#: the drill adapter of each channel (SMS and ringback share the outbox's name; calls have their own)
_DRILL_ADAPTERS = frozenset({DRILL_GATEWAY, "outbox-voice"})


def channel_adapter(runtime: Runtime, channel: str, gateways: list[str] | None) -> str:
    """The name of the adapter that would carry a run of this channel in this process."""
    if channel.startswith("ringback"):
        return runtime.ringback.name
    if channel == "voice":
        return runtime.voice.name
    return runtime.gateway_for(gateways).name


def is_drill(adapter: str) -> bool:
    """Whether an adapter only writes drill lines to a local file (no message leaves the machine)."""
    return adapter in _DRILL_ADAPTERS


@dataclass(frozen=True)
class RunContext:
    """What a worker needs to render a run's messages, rebuilt from the run's snapshot."""

    run_id: str
    campaign_id: str
    priority: str
    send_by: datetime | None
    composer: Composer
    status: str
    #: the campaign as snapshotted: its send window, time zone and frequency cap
    campaign: Campaign | None = None
    #: made without approval as a drill: only the drill gateway may send it, unless its version
    #: (``version``) has been approved since (approvals.py)
    drill: bool = False
    version: str | None = None
    #: the run's channel (``runs.channel``): sms, voice, ringback or ringback-restore
    channel: str = "sms"
    #: the run's recorded reason (a restore run names the enrol run it puts back)
    reason: str | None = None


def context_from_run(run: RunRecord) -> RunContext:
    campaign = run_campaign(run)
    owner = campaign.owner_department()
    composer = Composer(
        source=TemplateSource(name=run.template_name, text=run.template_text),
        signature=campaign.signature,
        opt_out_text=campaign.opt_out_text,
        variables=campaign.variables,
        campaign={"id": campaign.id, "title": campaign.title, "owner": owner.name if owner else campaign.owner},
    )
    return RunContext(
        run_id=run.id,
        campaign_id=run.campaign_id,
        priority=run.priority,
        send_by=run.send_by,
        composer=composer,
        status=run.status,
        campaign=campaign,
        drill=(run.approval_exempt or "").startswith("drill"),
        version=run.version_sha256,
        channel=run.channel,
        reason=run.reason,
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


def settled_outcome(row: Claimed, gateway: str, state: str, outcome: str, **fields: Any) -> Outcome:
    """An outcome decided without a gateway call (skipped, expired, capped, render failure)."""
    return Outcome(
        id=row.id, key=row.key, run_id=row.run_id, state=state, attempt=row.attempts,
        gateway=gateway, outcome=outcome, claim_token=row.claim_token, batch=row.batch, **fields,
    )  # fmt: skip


def internal_message(exc: BaseException) -> str:
    """What an unexpected exception says, fit for the log and the delivery row: numbers masked, short."""
    return mask_text(f"{type(exc).__name__}: {exc}")[:300]


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before the next try: the provider's hint, else capped exponential with jitter."""
    if retry_after is not None:
        return max(0.5, retry_after)
    return min(60.0, 2.0 ** max(0, attempt - 1)) * random.uniform(0.8, 1.2)


def outcome_for(
    row: Claimed,
    message: OutgoingMessage,
    result: SendResult | SendError,
    gateway: str,
    now: datetime,
    max_attempts: int,
) -> Outcome:
    common: dict[str, Any] = {
        "id": row.id,
        "key": row.key,
        "run_id": row.run_id,
        "claim_token": row.claim_token,
        "batch": row.batch,
        "attempt": row.attempts,
        # a failover list names the provider that took (or answered for) this message
        "gateway": getattr(result, "gateway", None) or gateway,
        "refusals": list(getattr(result, "refusals", None) or ()),
        "parts": message.parts,
        "encoding": message.encoding,
        "body": message.body,
    }
    if isinstance(result, SendResult):
        return Outcome(state=SENT, outcome="sent", provider_id=result.provider_id, trace=result.trace, **common)
    trace = getattr(result, "trace", None) or []
    # the engineer on call needs the recipient of a refused send; the log's masking processor shows its last digits
    log.warning(
        "send.refused",
        to=row.phone,
        code=result.code,
        retryable=result.retryable,
        attempt=row.attempts,
        gateway=common["gateway"],
    )
    if isinstance(result, AmbiguousSendError):
        return Outcome(
            state=UNKNOWN,
            outcome="unknown",
            error_code=result.code,
            error_message=result.message,
            trace=trace,
            **common,
        )
    if isinstance(result, RetryableSendError) or (result.retryable and not isinstance(result, PermanentSendError)):
        if row.attempts < max_attempts:
            delay = backoff(row.attempts, getattr(result, "retry_after", None))
            if message.send_by is not None and now + timedelta(seconds=delay) > message.send_by:
                # a retry is never scheduled past the campaign's deadline: the row expires now
                return Outcome(
                    state=EXPIRED, outcome="expired", error_code=result.code, reason="send_by_passed",
                    error_message=result.message, trace=trace, **common,
                )  # fmt: skip
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


@dataclass(frozen=True)
class BatchResult:
    claimed: int
    counts: dict[str, int]
    retry_in: float | None


def seconds_until(runtime: Runtime, when: datetime | None) -> float | None:
    if when is None:
        return None
    return max(0.0, (when - runtime.clock()).total_seconds())
