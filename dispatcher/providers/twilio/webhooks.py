"""Twilio's webhooks: message status callbacks and inbound replies (STOP and its Chinese equivalents).

Nothing a webhook says is believed until its ``X-Twilio-Signature`` holds
(``signature.py``): a request that fails the check gets 403 and changes nothing.
Status only moves forward (the ``DeliveryReports`` port): a ``sent`` that arrives
after ``delivered`` is ignored, and a repeated callback is harmless. Body size and
malformed headers are handled for every route by the web app's guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from twilio.twiml.messaging_response import MessagingResponse

from ...phones import mask
from ..base import DeliveryReports
from ..inbound import NOT_REGISTERED_REPLY, OPT_IN_REPLY, OPT_OUT_REPLY, keyword
from .signature import signed_params

if TYPE_CHECKING:
    from ...settings import Settings

log = structlog.get_logger("dispatcher.providers.twilio.webhooks")


def twiml(text: str | None) -> Response:
    reply = MessagingResponse()
    if text:
        reply.message(text)
    return Response(str(reply), media_type="application/xml")


def routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    async def signed(request: Request) -> dict[str, str] | None:
        return await signed_params(request, auth_token=settings.twilio_auth_token, public_url=settings.public_url)

    async def twilio_status(request: Request) -> Response:
        params = await signed(request)
        if params is None:
            log.warning("webhook.forged", endpoint="twilio.status")
            return Response("signature check failed", status_code=403)
        sid = params.get("MessageSid") or params.get("SmsSid") or ""
        status = params.get("MessageStatus") or params.get("SmsStatus") or ""
        error = params.get("ErrorCode") or None
        changed = await run_in_threadpool(
            reports.apply_status, sid, status, error_code=f"twilio.{error}" if error else None, actor="twilio"
        )
        log.info("webhook.status", provider_id=sid, status=status, changed=changed)
        return Response(status_code=204)

    async def twilio_inbound(request: Request) -> Response:
        params = await signed(request)
        if params is None:
            log.warning("webhook.forged", endpoint="twilio.inbound")
            return Response("signature check failed", status_code=403)
        phone = params.get("From", "").strip()
        action = keyword(params.get("Body", ""))
        if action is None or not phone:
            return twiml(None)
        known = await run_in_threadpool(reports.set_opted_out, phone, action == "opt_out")
        log.info("webhook.inbound", action=action, phone=mask(phone), in_registry=known)
        if not known:
            return twiml(NOT_REGISTERED_REPLY)
        return twiml(OPT_OUT_REPLY if action == "opt_out" else OPT_IN_REPLY)

    return [
        Route("/webhooks/twilio/status", twilio_status, methods=["POST"]),
        Route("/webhooks/twilio/inbound", twilio_inbound, methods=["POST"]),
    ]
