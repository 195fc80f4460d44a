"""What differs between the channels a run can send on, as strategy objects for the one batch skeleton.

``sender.process_batch`` claims, checks (run status, pause, send window, stopping), hands over in
chunks under the ``Gate`` (pause, cancel, stop, gateway down, claims taken away), records durably
(spooled when the log cannot be written), releases the claim on a crash and schedules retries the
same way for every run; a ``Channel`` supplies only what is its own:

- ``opens_at``: readiness, when the run may next hand anything over (None: now);
- ``gateway``: the adapter its rows go through;
- ``prepare``: one claimed row as a message to hand over, or an outcome settled without a call
  (opted out, expired, a template that does not render);
- ``capped`` / ``paced``: whether the per-person bulk cap and the shared rate limiter apply;
- ``deadline``: the moment after which nothing more is handed over (checked again after pacing);
- ``name``: the label of its batches on metrics (the run's ``channel``).

The channels: ``sms``; ``voice`` (one call per person, ``runtime.voice``); ``ringback``
(enrol each number with the warning tone from the window's start, never past its end) and
``ringback-restore`` (put each number back, whenever it runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from .batch import RunContext, internal_message, settled_outcome
from .errors import TemplateError
from .providers.base import OutgoingMessage
from .ringback import ENROL_CHANNEL, RESTORE_CHANNEL, RingbackSends, announcement_text
from .send_window import campaign_may_send
from .store import EXPIRED, FAILED, SKIPPED, Claimed, Outcome

if TYPE_CHECKING:
    from .providers.base import Gateway
    from .runtime import Runtime
    from .templates import Composer

log = structlog.get_logger("dispatcher.sender")

SMS = "sms"
VOICE = "voice"


@dataclass(slots=True)  # per recipient: not frozen (see providers.base.OutgoingMessage)
class Composed:
    body: str
    parts: int
    encoding: str


class Channel(Protocol):
    name: str
    #: bulk rows count against, and are held to, the per-person frequency cap
    capped: bool
    #: hand-overs wait for the shared rate limiter
    paced: bool

    def opens_at(self, runtime: Runtime, context: RunContext) -> datetime | None:
        """When the run may next hand something over; None when it may now."""
        ...

    def deadline(self, context: RunContext) -> datetime | None:
        """Nothing more is handed over after this moment (checked again after a wait for the limiter)."""
        ...

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:
        """The adapter this run's rows are handed to."""
        ...

    def prepare(self, context: RunContext, row: Claimed, now: datetime, gateway: str) -> OutgoingMessage | Outcome:
        """The message for one claimed row, or its outcome when nothing is to be handed over."""
        ...


def send_window_opening(runtime: Runtime, context: RunContext) -> datetime | None:
    """The daily hours of bulk messages and calls (urgent runs are not held), when enforced."""
    if not runtime.settings.send_window_enforced or context.campaign is None:
        return None
    return campaign_may_send(context.campaign, context.priority, runtime.clock())


class MessageChannel:
    """A message (or call) rendered per recipient from the campaign's template: SMS and voice."""

    name = SMS
    capped = True
    paced = True

    def opens_at(self, runtime: Runtime, context: RunContext) -> datetime | None:
        return send_window_opening(runtime, context)

    def deadline(self, context: RunContext) -> datetime | None:
        return context.send_by

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:  # pragma: no cover - abstract
        raise NotImplementedError

    def compose(self, context: RunContext, recipient: Mapping[str, Any]) -> Composed:  # pragma: no cover
        raise NotImplementedError

    def prepare(self, context: RunContext, row: Claimed, now: datetime, gateway: str) -> OutgoingMessage | Outcome:
        if row.opted_out:
            return settled_outcome(row, gateway, SKIPPED, "skipped", reason="opted_out")
        if context.send_by is not None and now > context.send_by:
            return settled_outcome(row, gateway, EXPIRED, "skipped", reason="send_by_passed")
        try:
            composed = self.compose(context, {"name": row.name, "district": row.district, "grid": row.grid})
        except TemplateError as exc:
            return settled_outcome(
                row, gateway, FAILED, "failed", error_code="template.render", error_message=exc.message
            )
        except Exception as exc:  # a template that raises for one recipient fails that row, not the batch
            log.warning("row.render_error", error=internal_message(exc))
            return settled_outcome(
                row, gateway, FAILED, "failed", error_code="render_error", error_message=internal_message(exc)
            )
        return OutgoingMessage(
            key=row.key,
            run_id=row.run_id,
            campaign_id=context.campaign_id,
            to=row.phone,
            body=composed.body,
            parts=composed.parts,
            encoding=composed.encoding,
            send_by=context.send_by,
            priority=context.priority,
            delivery_id=row.id,
        )


class SmsChannel(MessageChannel):
    name = SMS

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:
        # the campaign's ``gateways:`` list, else DISPATCH_GATEWAY (one adapter, or a failover list)
        return runtime.gateway_for(context.campaign.gateways if context.campaign is not None else None)

    def compose(self, context: RunContext, recipient: Mapping[str, Any]) -> Composed:
        body, seg = context.composer.render(recipient)
        return Composed(body, seg.parts, seg.encoding)


def voice_script(composer: Composer, recipient: Mapping[str, Any]) -> str:
    """What a call says: who speaks and the campaign's text for this recipient.

    No 【】 brackets and no SMS opt-out: a listener hears the sender named, and the call itself asks
    them to press 1 (``providers.base.CONFIRM_PROMPT``).
    """
    return composer.signature.strip("【】") + "提醒您：" + composer.body(recipient)


class VoiceChannel(MessageChannel):
    name = VOICE

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:
        return runtime.voice

    def compose(self, context: RunContext, recipient: Mapping[str, Any]) -> Composed:
        return Composed(voice_script(context.composer, recipient), 1, "voice")


class RingbackChannel:
    """Enrol (or, ``restoring``, restore) each number with the ringback adapter (``ringback.py``).

    Not capped (a tone reaches callers, not the resident) and not paced by the SMS rate limiter.
    Enrolment waits for the window's start and never starts or retries past its end; restore
    runs whenever it is asked to, opted-out numbers included (it undoes what was done to them).
    """

    capped = False
    paced = False

    def __init__(self, *, restoring: bool) -> None:
        self.restoring = restoring
        self.name = RESTORE_CHANNEL if restoring else ENROL_CHANNEL

    def opens_at(self, runtime: Runtime, context: RunContext) -> datetime | None:
        window = context.campaign.window if context.campaign is not None else None
        if self.restoring or window is None:
            return None
        return window.start if runtime.clock() < window.start else None

    def deadline(self, context: RunContext) -> datetime | None:
        return None  # enrolment's end is each message's ``send_by``; restore has none

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:
        campaign = context.campaign
        assert campaign is not None and campaign.window is not None
        enrol_run_id = (context.reason or "").removeprefix("restore of ") if self.restoring else context.run_id
        return RingbackSends(
            runtime.ringback,
            runtime.store,
            restoring=self.restoring,
            enrol_run_id=enrol_run_id,
            start=campaign.window.start,
            end=campaign.window.end,
        )

    def prepare(self, context: RunContext, row: Claimed, now: datetime, gateway: str) -> OutgoingMessage | Outcome:
        campaign = context.campaign
        assert campaign is not None and campaign.window is not None
        if not self.restoring and row.opted_out:
            return settled_outcome(row, gateway, SKIPPED, "skipped", reason="opted_out")
        if not self.restoring and now >= campaign.window.end:
            return settled_outcome(row, gateway, EXPIRED, "skipped", reason="window_ended")
        return OutgoingMessage(
            key=row.key,
            run_id=row.run_id,
            campaign_id=context.campaign_id,
            to=row.phone,
            body=announcement_text(context),
            parts=1,
            encoding="voice",
            # enrolment is never retried past the window's end; restoring is retried until attempts run out
            send_by=None if self.restoring else campaign.window.end,
            priority=context.priority,
            delivery_id=row.id,
        )


CHANNELS: dict[str, Channel] = {
    SMS: SmsChannel(),
    VOICE: VoiceChannel(),
    ENROL_CHANNEL: RingbackChannel(restoring=False),
    RESTORE_CHANNEL: RingbackChannel(restoring=True),
}


def channel_of(context: RunContext) -> Channel:
    """The channel a run sends on (the run's own ``channel``: a restore run is ``ringback-restore``)."""
    return CHANNELS.get(context.channel, CHANNELS[SMS])
