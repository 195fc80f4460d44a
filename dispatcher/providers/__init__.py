"""Providers (courier's handler pattern): one package per provider, one registry by name.

``base`` declares what a provider is (its adapters' protocols, its capabilities,
the ``DeliveryReports`` port its webhooks write through); ``registry`` finds a
provider by name. Each package (``outbox``, ``twilio``, ``http``, ``kannel``) owns
its adapters, its webhook routes, its signature check and its error table.
``httptrace`` (redacted traces of every exchange) and ``inbound`` (form parsing,
opt-out keywords) are shared by the packages. Providers never import the store:
the import-linter contract in ``pyproject.toml`` keeps it so.
"""

from __future__ import annotations

from .base import BaseGateway, Gateway, LookupRequest, OutgoingMessage, Provider, SendResult
from .registry import create_gateway, create_ringback, register

__all__ = [
    "BaseGateway",
    "Gateway",
    "LookupRequest",
    "OutgoingMessage",
    "Provider",
    "SendResult",
    "create_gateway",
    "create_ringback",
    "register",
]
