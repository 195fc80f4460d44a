"""Twilio's webhooks: message and call status callbacks, a call's key press, and inbound replies (STOP).

A call's status (``CallStatus``) is translated by ``CALL_STATUSES`` (answered -> delivered; busy,
no-answer, failed, canceled -> failed with ``voice.*``) and applied like a message's; a key press
(``Digits`` from the call's ``<Gather>``) is recorded on the delivery the URL names: 1 confirms.

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
from twilio.twiml.voice_response import VoiceResponse

from ...phones import mask
from ..base import CALL_STATUSES, DeliveryReports
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

    async def voice_status(request: Request) -> Response:
        params = await signed(request)
        if params is None:
            log.warning("webhook.forged", endpoint="twilio.voice_status")
            return Response("signature check failed", status_code=403)
        sid = params.get("CallSid", "")
        call_status = params.get("CallStatus", "").strip().lower()
        word, code = CALL_STATUSES.get(call_status, (None, None))
        changed = 0
        if word is not None and sid:
            changed = await run_in_threadpool(reports.apply_status, sid, word, error_code=code, actor="twilio")
        log.info("webhook.call_status", provider_id=sid, status=call_status, changed=changed)
        return Response(status_code=204)

    async def voice_gather(request: Request) -> Response:
        delivery_id = int(request.path_params["delivery"])
        params = await signed(request)
        if params is None:
            log.warning("webhook.forged", endpoint="twilio.voice_gather", delivery_id=delivery_id)
            return Response("signature check failed", status_code=403)
        digits = params.get("Digits", "").strip()
        outcome = "none"
        if digits:
            outcome = await run_in_threadpool(
                reports.key_press, delivery_id, digits, call_sid=params.get("CallSid") or None, actor="twilio"
            )
        log.info("webhook.key_press", delivery_id=delivery_id, outcome=outcome)
        from .twiml import CONFIRMED_REPLY, GOODBYE

        response = VoiceResponse()
        confirmed = outcome in ("confirmed", "repeated")
        response.say(CONFIRMED_REPLY if confirmed else GOODBYE, language="zh-CN", voice="alice")
        response.hangup()
        return Response(str(response), media_type="application/xml")

    return [
        Route("/webhooks/twilio/voice/status", voice_status, methods=["POST"]),
        Route("/webhooks/twilio/voice/{delivery:int}/gather", voice_gather, methods=["POST"]),
        Route("/webhooks/twilio/status", twilio_status, methods=["POST"]),
        Route("/webhooks/twilio/inbound", twilio_inbound, methods=["POST"]),
    ]
