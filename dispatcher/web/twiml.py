"""``/twiml/ringback/{campaign}``: the pre-connect announcement of a ringback campaign on Twilio numbers.

For a number hosted on Twilio, "enrolling" it in a ringback campaign points its
voice URL here, with the URL it had before in ``then``. A caller hears the
warning in zh-CN and is then redirected to the kept URL, so the call goes on
exactly as before. Twilio signs the whole URL (``then`` included), so the
redirect target cannot be swapped by someone who does not hold the auth token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from ..batch import context_from_run
from ..ringback import ENROL_CHANNEL, announcement_text
from .webhooks import form_fields

if TYPE_CHECKING:
    from ..runtime import Runtime

log = structlog.get_logger("dispatcher.web.twiml")

FALLBACK_WARNING = "反诈提醒：公检法机关不会电话办案，不会要求转账到安全账户。请勿轻信陌生来电，谨防电信网络诈骗。"


def announcement(runtime: Runtime, campaign_id: str) -> str:
    """The warning text of the newest ringback run of the campaign (its snapshot), without the SMS opt-out."""
    for run in runtime.store.list_runs(limit=20, campaign_id=campaign_id):
        if run["channel"] != ENROL_CHANNEL:
            continue
        try:
            return announcement_text(context_from_run(run))
        except Exception:  # a snapshot that no longer renders must not silence the warning
            log.exception("twiml.render_failed", campaign_id=campaign_id)
            break
    return FALLBACK_WARNING


def voice_twiml(text: str, then: str | None) -> str:
    response = VoiceResponse()
    response.say(text, language="zh-CN", voice="alice")
    if then:
        response.redirect(then)
    return str(response)


def routes(runtime: Runtime) -> list[Route]:
    settings = runtime.settings

    async def ringback(request: Request) -> Response:
        campaign_id = request.path_params["campaign"]
        params: dict[str, str] = {}
        if request.method == "POST":
            params = await form_fields(request)
        signature = request.headers.get("X-Twilio-Signature", "")
        url = settings.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if not (
            signature
            and settings.twilio_auth_token
            and RequestValidator(settings.twilio_auth_token).validate(url, params, signature)
        ):
            log.warning("webhook.forged", endpoint="twiml.ringback", campaign_id=campaign_id)
            return Response("signature check failed", status_code=403)
        text = await run_in_threadpool(announcement, runtime, campaign_id)
        then = request.query_params.get("then") or None
        return Response(voice_twiml(text, then), media_type="application/xml")

    async def unrouted(_request: Request) -> Response:
        # what a restored number that never had a voice URL answers: the call is rejected, as before
        response = VoiceResponse()
        response.reject()
        return Response(str(response), media_type="application/xml")

    return [
        Route("/twiml/ringback/{campaign}", ringback, methods=["GET", "POST"]),
        Route("/twiml/unrouted", unrouted, methods=["GET", "POST"]),
    ]
