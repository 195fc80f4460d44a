"""``/twiml/ringback/{campaign}``: the pre-connect announcement of a ringback campaign on Twilio numbers.

For a number hosted on Twilio, "enrolling" it in a ringback campaign points its
voice URL here, with the URL it had before in ``then``. A caller hears the
warning in zh-CN and is then redirected to the kept URL, so the call goes on
exactly as before. The request must carry Twilio's signature (``signature.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from twilio.twiml.voice_response import VoiceResponse

from ..base import DeliveryReports
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


def routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
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
        Route("/twiml/ringback/{campaign}", ringback, methods=["GET", "POST"]),
        Route("/twiml/unrouted", unrouted, methods=["GET", "POST"]),
    ]
