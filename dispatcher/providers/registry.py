"""Providers by name: each provider package registers its ``Provider`` here, the runtime asks by name.

``DISPATCH_GATEWAY`` names a provider serving the ``sms`` channel,
``DISPATCH_RINGBACK_GATEWAY`` a ringback adapter by its ``ringback_name``,
``DISPATCH_VOICE_GATEWAY`` a voice adapter by its ``voice_name``; the
web app asks every provider for its webhook routes. The provider packages are
imported on first use (``BUILTIN``); importing one is cheap, because a package's
``__init__`` only declares its ``Provider`` and builds adapters lazily.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import DeliveryReports, Gateway, Provider, RingbackGateway, VoiceGateway

if TYPE_CHECKING:
    import httpx
    from starlette.routing import BaseRoute

    from ..settings import Settings

#: the provider packages shipped with the dispatcher, in the order their names are listed
BUILTIN = (
    "dispatcher.providers.outbox",
    "dispatcher.providers.twilio",
    "dispatcher.providers.http",
    "dispatcher.providers.kannel",
)

_providers: dict[str, Provider] = {}
_loaded = False
_lock = threading.Lock()


def register(provider: Provider) -> Provider:
    """Make ``provider`` available by its name (a provider package calls this when it is imported)."""
    existing = _providers.get(provider.name)
    if existing is not None and existing is not provider:
        raise ValueError(f"provider {provider.name!r} is registered twice")
    _providers[provider.name] = provider
    return provider


def providers() -> list[Provider]:
    """Every registered provider, built-in ones first."""
    global _loaded
    with _lock:
        if not _loaded:
            for module in BUILTIN:
                importlib.import_module(module)
            _loaded = True
    return list(_providers.values())


def gateway_names() -> list[str]:
    return [p.name for p in providers() if "sms" in p.channels]


def ringback_names() -> list[str]:
    return [p.ringback_name for p in providers() if "ringback" in p.channels and p.ringback_name]


def voice_names() -> list[str]:
    return [p.voice_name for p in providers() if "voice" in p.channels and p.voice_name]


def reporter_gateways() -> dict[str, tuple[str, ...]]:
    """Which gateways' rows each provider's delivery reports may move (providers that say so)."""
    return {p.name: p.reports_for for p in providers() if p.reports_for is not None}


def create_gateway(settings: Settings, name: str | None = None) -> Gateway:
    """The SMS adapter named ``name`` (default: the one ``DISPATCH_GATEWAY`` names), configured from ``settings``.

    A failover list (``twilio,http``) is built by the runtime, one adapter per name, over this.
    """
    wanted = name if name is not None else settings.gateway
    for provider in providers():
        if provider.name == wanted and provider.gateway is not None:
            return provider.gateway(settings)
    raise ConfigError(f"DISPATCH_GATEWAY: {unknown_gateways([wanted])}")


def batch_capacity(settings: Settings, names: Sequence[str]) -> int:
    """The most numbers one call of any of these SMS gateways carries, from their configuration alone."""
    wanted = set(names)
    return max(
        [1, *(p.batch_capacity(settings) for p in providers() if p.name in wanted and p.batch_capacity is not None)]
    )


def unknown_gateways(names: Sequence[str]) -> str | None:
    """What is wrong with a list of SMS gateway names (one line naming the registered ones), or None."""
    known = gateway_names()
    bad = [n for n in names if n not in known]
    if not bad:
        return None
    which = "unknown gateway" if len(bad) == 1 else "unknown gateways"
    return f"{which} {', '.join(repr(b) for b in bad)} (known: {', '.join(sorted(known))})"


def create_ringback(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> RingbackGateway:
    """The ringback adapter ``DISPATCH_RINGBACK_GATEWAY`` names."""
    name = settings.ringback_gateway
    for provider in providers():
        if provider.ringback_name == name and provider.ringback is not None:
            return provider.ringback(settings, transport=transport, extra_headers=extra_headers)
    raise ConfigError(
        f"DISPATCH_RINGBACK_GATEWAY: unknown ringback adapter {name!r} (known: {', '.join(sorted(ringback_names()))})"
    )


def create_voice(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> VoiceGateway:
    """The voice adapter ``DISPATCH_VOICE_GATEWAY`` names."""
    name = settings.voice_gateway
    for provider in providers():
        if provider.voice_name == name and provider.voice is not None:
            return provider.voice(settings, transport=transport, extra_headers=extra_headers)
    raise ConfigError(
        f"DISPATCH_VOICE_GATEWAY: unknown voice adapter {name!r} (known: {', '.join(sorted(voice_names()))})"
    )


def routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    """The webhook routes of every provider, each writing through ``reports``."""
    out: list[BaseRoute] = []
    for provider in providers():
        if provider.routes is not None:
            out.extend(provider.routes(reports, settings))
    return out
