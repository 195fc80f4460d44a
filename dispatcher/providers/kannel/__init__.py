"""Kannel (``DISPATCH_GATEWAY=kannel``): SMS through a Kannel ``smsbox``, delivery reports on our DLR route.

A SKELETON. What it does: builds the ``GET /cgi-bin/sendsms`` request (``gateway.py``),
classifies smsbox's answers in one table, and serves ``/webhooks/kannel/dlr``
(``webhooks.py``), authenticated by an HMAC in the DLR URL. Its tests
(``tests/test_kannel_provider.py``) run it on ``httpx.MockTransport``.

What remains before it is used for real:

- a test against a real Kannel (Debian ``kannel``: bearerbox + smsbox + ``fakesmsc``),
  sending and receiving DLRs end to end; planned;
- its own settings: the skeleton reads the smsbox URL and credentials from
  ``DISPATCH_HTTP_SECRET_KANNEL_URL`` / ``_USERNAME`` / ``_PASSWORD`` (``Settings.gateway_secrets``)
  so that adding it touched nothing outside this package but its registration;
- delivery reports are scoped only by the ``kannel:`` prefix of its provider ids; the store's
  reporter scoping (rows a reporter may move) does not know the ``kannel`` actor yet;
- the DLR HMAC is keyed with the sendsms password; a secret of its own, a ``POST`` sendsms for
  long texts, ``validity`` from ``send_by``, and inbound (MO) opt-outs are not done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import DeliveryReports, Gateway, Provider
from ..registry import register

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from ...settings import Settings

SECRET = "DISPATCH_HTTP_SECRET_KANNEL_"


def _gateway(settings: Settings) -> Gateway:
    from .gateway import KannelGateway

    secrets = settings.gateway_secrets
    return KannelGateway(
        sendsms_url=secrets.get(SECRET + "URL", ""),
        username=secrets.get(SECRET + "USERNAME", ""),
        password=secrets.get(SECRET + "PASSWORD", ""),
        public_url=settings.public_url,
        timeout=settings.gateway_timeout,
    )


def _routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    from . import webhooks

    return webhooks.routes(reports, settings, secret=settings.gateway_secrets.get(SECRET + "PASSWORD", ""))


PROVIDER = register(Provider(name="kannel", channels=frozenset({"sms"}), gateway=_gateway, routes=_routes))
