"""Kannel (``DISPATCH_GATEWAY=kannel``): SMS through a Kannel ``smsbox``, delivery reports on our DLR route.

- ``gateway.py``: the ``GET /cgi-bin/sendsms`` request, smsbox's answers classified in
  one table, and the DLR URL (our provider id and a per-message token) it hands Kannel;
- ``webhooks.py``: ``/webhooks/kannel/dlr``, where smsbox reports what the SMSC said.

Its settings are its own (``DISPATCH_KANNEL_URL``, ``_USERNAME``, ``_PASSWORD``,
``_FROM``, ``_DLR_SECRET``), read once in ``Settings``. ``tests/test_kannel_real.py``
runs it against Debian's bearerbox, smsbox and ``fakesmsc``.

Not done: a ``POST`` sendsms for very long texts, ``validity`` from ``send_by``, and
inbound (MO) opt-outs through an ``sms-service``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import DeliveryReports, Gateway, Provider
from ..registry import register

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from ...settings import Settings


def _gateway(settings: Settings) -> Gateway:
    from .gateway import KannelGateway

    return KannelGateway(
        sendsms_url=settings.kannel_sendsms_url,
        username=settings.kannel_username,
        password=settings.kannel_password,
        dlr_secret=settings.kannel_dlr_secret,
        sender=settings.kannel_from,
        public_url=settings.public_url,
        timeout=settings.gateway_timeout,
    )


def _routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    from . import webhooks

    return webhooks.routes(reports, settings, secret=settings.kannel_dlr_secret)


PROVIDER = register(
    Provider(
        name="kannel",
        channels=frozenset({"sms"}),
        gateway=_gateway,
        routes=_routes,
        # a DLR token is keyed with this provider's secret: it speaks only for rows Kannel took
        reports_for=("kannel",),
    )
)
