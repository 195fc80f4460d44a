"""Providers are found by name in one registry: the runtime's adapters, the web app's webhook routes.

A misspelt ``DISPATCH_GATEWAY`` / ``DISPATCH_RINGBACK_GATEWAY`` is refused with the
names that exist, and a provider's webhook routes are served without the web app
naming them.
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route

from dispatcher.errors import ConfigError
from dispatcher.providers import create_gateway, create_ringback
from dispatcher.providers.registry import gateway_names, providers, ringback_names, voice_names
from dispatcher.web.app import create_app


def test_unknown_gateway_is_refused_with_every_registered_name(project: Any) -> None:
    project.env["DISPATCH_GATEWAY"] = "twillio"
    with pytest.raises(ConfigError) as caught:
        create_gateway(project.settings())
    assert str(caught.value).startswith("DISPATCH_GATEWAY: unknown gateway 'twillio' (known: ")
    for name in ("outbox", "twilio", "http", "kannel"):
        assert name in str(caught.value)


def test_unknown_ringback_adapter_is_refused_with_every_registered_name(project: Any) -> None:
    project.env["DISPATCH_RINGBACK_GATEWAY"] = "carrier"
    with pytest.raises(ConfigError) as caught:
        create_ringback(project.settings())
    # sorted, so the message does not depend on which provider happened to be imported first
    assert "known: carrier-http, outbox, twilio-announce)" in str(caught.value)


def test_every_provider_declares_what_it_serves() -> None:
    assert set(gateway_names()) >= {"outbox", "twilio", "http", "kannel"}
    assert set(ringback_names()) == {"outbox", "twilio-announce", "carrier-http"}
    assert set(voice_names()) == {"outbox", "twilio", "http"}
    for provider in providers():
        assert provider.channels <= {"sms", "ringback", "voice"}


def test_the_web_app_serves_every_providers_webhooks(project: Any) -> None:
    paths = {r.path for r in create_app(project.runtime()).routes if isinstance(r, Route)}
    assert {
        "/webhooks/twilio/status",
        "/webhooks/twilio/inbound",
        "/twiml/ringback/{campaign}",
        "/twiml/unrouted",
        "/webhooks/http/report",
        "/webhooks/kannel/dlr",
    } <= paths
