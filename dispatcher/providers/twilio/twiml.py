"""TwiML we serve Twilio: the ringback announcement and what a voice call says.

``/twiml/ringback/{campaign}``: for a number hosted on Twilio, "enrolling" it in a
ringback campaign points its voice URL here, with the URL it had before in ``then``. A
caller hears the warning in zh-CN and is then redirected to the kept URL, so the call
goes on exactly as before.

``/twiml/voice/{delivery}``: what a voice campaign's call says once answered: the
warning rendered for that recipient, in Mandarin, said twice inside a ``<Gather>`` that
asks the listener to press 1 to confirm; the key goes to the call's gather webhook
(``webhooks.py``). Keyed by the delivery row, so no number appears in a URL.

Every request must carry Twilio's signature (``signature.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from twilio.twiml.voice_response import VoiceResponse

from ..base import CONFIRM_PROMPT, DeliveryReports
from .signature import signed_params

if TYPE_CHECKING:
    from ...settings import Settings

log = structlog.get_logger("dispatcher.providers.twilio.twiml")

#: said when the campaign has no ringback run whose warning renders: a caller must never hear silence
FALLBACK_WARNING = "反诈提醒：公检法机关不会电话办案，不会要求转账到安全账户。请勿轻信陌生来电，谨防电信网络诈骗。"


def voice_twiml(text: str, then: str | None) -> str:
    response = VoiceResponse()
    response.say(text, language="zh-CN", voice="alice")
    if then:
        response.redirect(then)
    return str(response)


#: seconds the call waits for a key after the last prompt
GATHER_TIMEOUT = 8
GOODBYE = "感谢您的收听，再见。"
CONFIRMED_REPLY = "您已确认收听，感谢配合。如遇可疑情况请拨打96110。再见。"


def call_twiml(text: str, gather_url: str) -> str:
    """The warning and the press-1 prompt, said twice in zh-CN while a single key is awaited."""
    response = VoiceResponse()
    gather = response.gather(
        input="dtmf", num_digits=1, action=gather_url, method="POST", timeout=GATHER_TIMEOUT
    )
    for _ in range(2):
        gather.say(f"{text} {CONFIRM_PROMPT}", language="zh-CN", voice="alice")
    response.say(GOODBYE, language="zh-CN", voice="alice")
    return str(response)


def gather_url(public_url: str, delivery_id: int) -> str:
    return f"{public_url.rstrip('/')}/webhooks/twilio/voice/{delivery_id}/gather"


def routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    async def voice(request: Request) -> Response:
        delivery_id = int(request.path_params["delivery"])
        params = await signed_params(request, auth_token=settings.twilio_auth_token, public_url=settings.public_url)
        if params is None:
            log.warning("webhook.forged", endpoint="twiml.voice", delivery_id=delivery_id)
            return Response("signature check failed", status_code=403)
        try:
            text = await run_in_threadpool(reports.voice_script, delivery_id)
        except Exception:  # a snapshot that no longer renders must not silence the warning
            log.exception("twiml.voice_render_failed", delivery_id=delivery_id)
            text = FALLBACK_WARNING
        if text is None:
            # not one of our calls (or its row is gone): say nothing that could mislead, end the call
            response = VoiceResponse()
            response.hangup()
            return Response(str(response), media_type="application/xml")
        return Response(call_twiml(text, gather_url(settings.public_url, delivery_id)), media_type="application/xml")

    async def ringback(request: Request) -> Response:
        campaign_id = request.path_params["campaign"]
        params = await signed_params(request, auth_token=settings.twilio_auth_token, public_url=settings.public_url)
        if params is None:
            log.warning("webhook.forged", endpoint="twiml.ringback", campaign_id=campaign_id)
            return Response("signature check failed", status_code=403)
        text = await run_in_threadpool(reports.ringback_text, campaign_id)
        then = request.query_params.get("then") or None
        return Response(voice_twiml(text or FALLBACK_WARNING, then), media_type="application/xml")

    async def unrouted(_request: Request) -> Response:
        # what a restored number that never had a voice URL answers: the call is rejected, as before
        response = VoiceResponse()
        response.reject()
        return Response(str(response), media_type="application/xml")

    return [
        Route("/twiml/voice/{delivery:int}", voice, methods=["GET", "POST"]),
        Route("/twiml/ringback/{campaign}", ringback, methods=["GET", "POST"]),
        Route("/twiml/unrouted", unrouted, methods=["GET", "POST"]),
    ]
