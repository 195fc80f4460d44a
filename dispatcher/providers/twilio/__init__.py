"""Twilio: the SMS adapter, the ``twilio-announce`` ringback, and every webhook Twilio calls.

- ``gateway.py``: ``DISPATCH_GATEWAY=twilio``, the real ``twilio`` client over our traced
  HTTP client, and its one error table (``TWILIO_CODES`` read by ``classify``);
- ``ringback.py``: ``DISPATCH_RINGBACK_GATEWAY=twilio-announce``, a pre-connect announcement
  through the number's voice URL;
- ``voice.py``: ``DISPATCH_VOICE_GATEWAY=twilio``, one call per delivery through the Calls API;
- ``webhooks.py``: message and call status callbacks, a call's key press, inbound STOP;
  ``twiml.py``: the ringback TwiML and what a voice call says;
- ``signature.py``: the one ``X-Twilio-Signature`` check all of them use.

The ``twilio`` library is imported only when Twilio is chosen or its routes are served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..base import DeliveryReports, Gateway, Provider, RingbackGateway, VoiceGateway
from ..registry import register

if TYPE_CHECKING:
    import httpx
    from starlette.routing import BaseRoute

    from ...settings import Settings


def _gateway(settings: Settings) -> Gateway:
    from .gateway import TwilioGateway

    return TwilioGateway(
        account_sid=settings.twilio_account_sid,
        auth_token=settings.twilio_auth_token,
        from_=settings.twilio_from,
        messaging_service_sid=settings.twilio_messaging_service_sid,
        public_url=settings.public_url,
        base_url=settings.twilio_base_url,
        timeout=settings.gateway_timeout,
        concurrency=settings.gateway_concurrency,
    )


def _ringback(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> RingbackGateway:
    from .gateway import TwilioGateway
    from .ringback import TwilioAnnounce

    sms = TwilioGateway(
        account_sid=settings.twilio_account_sid,
        auth_token=settings.twilio_auth_token,
        from_=settings.twilio_from or "announce-only",
        messaging_service_sid=settings.twilio_messaging_service_sid,
        public_url=settings.public_url,
        base_url=settings.twilio_base_url,
        timeout=settings.gateway_timeout,
        transport=transport,
        extra_headers=extra_headers,
    )
    return TwilioAnnounce(sms, settings.public_url)


def _voice(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> VoiceGateway:
    from .voice import TwilioVoice

    return TwilioVoice(
        account_sid=settings.twilio_account_sid,
        auth_token=settings.twilio_auth_token,
        from_=settings.twilio_from,
        public_url=settings.public_url,
        base_url=settings.twilio_base_url,
        timeout=settings.gateway_timeout,
        transport=transport,
        extra_headers=extra_headers,
    )


def _routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    from . import twiml, webhooks

    return [*webhooks.routes(reports, settings), *twiml.routes(reports, settings)]


PROVIDER = register(
    Provider(
        name="twilio",
        channels=frozenset({"sms", "ringback", "voice"}),
        gateway=_gateway,
        ringback_name="twilio-announce",
        ringback=_ringback,
        voice_name="twilio",
        voice=_voice,
        routes=_routes,
    )
)
