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

GATEWAYS = ("outbox",)


def create_gateway(settings: Settings) -> Gateway:
    """The adapter ``DISPATCH_GATEWAY`` names, configured from ``settings``."""
    name = settings.gateway
    if name == "outbox":
        from .outbox import OutboxGateway

        return OutboxGateway(
            settings.outbox_path,
            fail_permanent=settings.outbox_fail_permanent,
            fail_transient=settings.outbox_fail_transient,
        )
    raise ConfigError(f"DISPATCH_GATEWAY: unknown gateway {name!r} (known: {', '.join(GATEWAYS)})")
