"""A carrier or SMS platform plugged in by a config file: the generic HTTP adapter and ``carrier-http`` ringback.

- ``gateway.py``: ``DISPATCH_GATEWAY=http``, its config file (``DISPATCH_HTTP_CONFIG``) and its
  error table (the codes the config names);
- ``ringback.py``: ``DISPATCH_RINGBACK_GATEWAY=carrier-http``, two config sections (enrol, restore);
- ``voice.py``: ``DISPATCH_VOICE_GATEWAY=http``, a carrier's voice-notification API, same config format
  (``DISPATCH_VOICE_CONFIG``);
- ``webhooks.py``: the signed delivery-report routes (SMS and voice calls).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ..base import DeliveryReports, Gateway, Provider, RingbackGateway, VoiceGateway
from ..registry import register

if TYPE_CHECKING:
    import httpx
    from starlette.routing import BaseRoute

    from ...settings import Settings


def _gateway(settings: Settings) -> Gateway:
    from .gateway import HttpGateway, load_config

    if settings.http_config is None:
        raise ConfigError("DISPATCH_HTTP_CONFIG must name the HTTP adapter's config file")
    config = load_config(settings.http_config, env=settings.gateway_secrets)
    return HttpGateway(config, timeout=settings.gateway_timeout, concurrency=settings.gateway_concurrency)


def _batch_capacity(settings: Settings) -> int:
    from .gateway import load_config

    if settings.http_config is None:
        return 1
    config = load_config(settings.http_config, env=settings.gateway_secrets)
    return config.batch.max_size if config.batch is not None else 1


def _ringback(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> RingbackGateway:
    from .gateway import HttpGateway, load_config
    from .ringback import CarrierHttpRingback

    if settings.ringback_config is None:
        raise ConfigError("DISPATCH_RINGBACK_CONFIG must name the carrier's ringback config file")
    enrol = load_config(settings.ringback_config, env=settings.gateway_secrets, section="enrol")
    restore = load_config(settings.ringback_config, env=settings.gateway_secrets, section="restore")
    # the batch skeleton drives the numbers concurrently (``RingbackSends``); each section's client
    # pools as many keep-alive connections
    pool = settings.gateway_concurrency
    return CarrierHttpRingback(
        HttpGateway(enrol, timeout=settings.gateway_timeout, transport=transport, connections=pool),
        HttpGateway(restore, timeout=settings.gateway_timeout, transport=transport, connections=pool),
        concurrency=pool,
    )


def _voice(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> VoiceGateway:
    from .voice import load_voice

    if settings.voice_config is None:
        raise ConfigError("DISPATCH_VOICE_CONFIG must name the carrier's voice config file")
    return load_voice(
        settings.voice_config, env=settings.gateway_secrets, timeout=settings.gateway_timeout, transport=transport
    )


def _routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    from . import webhooks

    return webhooks.routes(reports, settings)


PROVIDER = register(
    Provider(
        name="http",
        channels=frozenset({"sms", "ringback", "voice"}),
        gateway=_gateway,
        batch_capacity=_batch_capacity,
        ringback_name="carrier-http",
        ringback=_ringback,
        voice_name="http",
        voice=_voice,
        routes=_routes,
        # the report secret is this provider's: it speaks for the rows its three adapters sent
        reports_for=("http", "carrier-http", "http-voice"),
    )
)
