"""Gateway adapters: ``base`` defines the protocol; one module per adapter.

Adapters with third-party dependencies are imported lazily, so the embedded
default (``outbox``) works without them being configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import BaseGateway, Gateway, LookupRequest, OutgoingMessage, SendResult

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["BaseGateway", "Gateway", "LookupRequest", "OutgoingMessage", "SendResult", "create_gateway"]

GATEWAYS = ("outbox", "twilio", "http")


def create_gateway(settings: Settings) -> Gateway:
    """The adapter ``DISPATCH_GATEWAY`` names, configured from ``settings``."""
    name = settings.gateway
    if name == "outbox":
        from .outbox import OutboxGateway

        return OutboxGateway(
            settings.outbox_path,
            fail_permanent=settings.outbox_fail_permanent,
            fail_transient=settings.outbox_fail_transient,
            latency_ms=settings.outbox_latency_ms,
        )
    if name == "twilio":
        from .twilio import TwilioGateway

        return TwilioGateway(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            from_=settings.twilio_from,
            messaging_service_sid=settings.twilio_messaging_service_sid,
            public_url=settings.public_url,
            base_url=settings.twilio_base_url,
            timeout=settings.gateway_timeout,
        )
    if name == "http":
        from .http import HttpGateway, load_config

        if settings.http_config is None:
            raise ConfigError("DISPATCH_HTTP_CONFIG must name the HTTP adapter's config file")
        config = load_config(settings.http_config, env=settings.gateway_secrets)
        return HttpGateway(config, timeout=settings.gateway_timeout)
    raise ConfigError(f"DISPATCH_GATEWAY: unknown gateway {name!r} (known: {', '.join(GATEWAYS)})")
