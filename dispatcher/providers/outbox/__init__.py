"""The local provider (``outbox``): SMS and ringback written as JSON lines to files, for demos, drills and tests.

Shipped in the package like dramatiq's stub backend: no third-party service and no
webhooks. ``gateway.py`` is the SMS outbox, ``ringback.py`` the ringback outbox, ``voice.py`` voice calls
(lines of the SMS outbox marked ``"channel": "voice"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..base import Gateway, Provider, RingbackGateway, VoiceGateway
from ..registry import register

if TYPE_CHECKING:
    from ...settings import Settings


def _gateway(settings: Settings) -> Gateway:
    from .gateway import OutboxGateway

    return OutboxGateway(
        settings.outbox_path,
        fail_permanent=settings.outbox_fail_permanent,
        fail_transient=settings.outbox_fail_transient,
        latency_ms=settings.outbox_latency_ms,
        undelivered=settings.outbox_undelivered,
        no_report=settings.outbox_no_report,
    )


def _ringback(settings: Settings, **_http: Any) -> RingbackGateway:
    from .ringback import OutboxRingback

    return OutboxRingback(settings.outbox_path.with_name("ringback.jsonl"))


def _voice(settings: Settings, **_http: Any) -> VoiceGateway:
    from .voice import OutboxVoice

    # the SMS outbox file, each call a line with "channel": "voice"
    return OutboxVoice(settings.outbox_path)


PROVIDER = register(
    Provider(
        name="outbox",
        channels=frozenset({"sms", "ringback", "voice"}),
        gateway=_gateway,
        ringback_name="outbox",
        ringback=_ringback,
        voice_name="outbox",
        voice=_voice,
    )
)
