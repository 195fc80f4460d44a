"""What differs between the channels a run can send on, as strategy objects for the one batch skeleton.

``sender.process_batch`` claims, checks (run status, pause, send window, stopping), hands over in
paced chunks under the ``Gate``, records durably and schedules retries the same way for every
channel; a ``Channel`` supplies only what is its own:

- ``gateway``: the adapter its messages go through (SMS: the campaign's ``gateways:`` list or
  ``DISPATCH_GATEWAY``; voice: ``runtime.voice``);
- ``compose``: the text for one recipient, with its parts and encoding;
- ``name``: the channel's label on metrics and on ``runs.channel``.

Readiness (the send window) is the campaign's: bulk SMS and bulk voice calls wait for the daily
hours, urgent ones with a reason do not (``batch.window_opening``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .batch import RunContext

if TYPE_CHECKING:
    from .providers.base import Gateway
    from .runtime import Runtime
    from .templates import Composer

SMS = "sms"
VOICE = "voice"


@dataclass(frozen=True)
class Composed:
    body: str
    parts: int
    encoding: str


class Channel(Protocol):
    name: str

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:
        """The adapter this run's messages are handed to."""
        ...

    def compose(self, context: RunContext, recipient: Mapping[str, Any]) -> Composed:
        """The message for one recipient; raises ``TemplateError`` when it does not render."""
        ...


class SmsChannel:
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
    them to press 1 (``providers/twilio/twiml.py``).
    """
    return composer.signature.strip("【】") + "提醒您：" + composer.body(recipient)


class VoiceChannel:
    name = VOICE

    def gateway(self, runtime: Runtime, context: RunContext) -> Gateway:
        return runtime.voice

    def compose(self, context: RunContext, recipient: Mapping[str, Any]) -> Composed:
        return Composed(voice_script(context.composer, recipient), 1, "voice")


CHANNELS: dict[str, Channel] = {SMS: SmsChannel(), VOICE: VoiceChannel()}


def channel_of(context: RunContext) -> Channel:
    """The channel a run sends on (its campaign's ``channel``)."""
    name = context.campaign.channel if context.campaign is not None else SMS
    return CHANNELS.get(name, CHANNELS[SMS])
