"""Provider webhooks: Twilio status callbacks and inbound replies, and the HTTP adapter's delivery reports.

Nothing a webhook says is believed until it is authenticated: Twilio requests by
their ``X-Twilio-Signature`` (HMAC-SHA1 over the public URL and the form fields,
checked with ``twilio.request_validator.RequestValidator`` against
``DISPATCH_PUBLIC_URL`` because the proxy in front of us changes host and scheme),
delivery reports by an HMAC-SHA256 of the raw body. A request that fails the check
gets 403 and changes nothing.

Status only moves forward (``SqlStore.apply_status``): a ``sent`` that arrives
after ``delivered`` is ignored, and a repeated callback is harmless. A delivery
report signed with the HTTP adapter's secret only moves rows that adapter sent:
one provider's key must not rewrite another provider's results.

A STOP from a number that is not in the registry records nothing (there is no
resident to mark), so the reply says so instead of confirming an opt-out that did
not happen; the operator who later imports the number sees no opt-out for it.
Body size and malformed headers are handled for every route by guard.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from ..phones import mask

if TYPE_CHECKING:
    from ..runtime import Runtime

log = structlog.get_logger("dispatcher.web.webhooks")

#: replies that opt a number out (China: T / TD / 退订; Twilio's own STOP words), compared case-folded
OPT_OUT_WORDS = frozenset({"stop", "t", "td", "退订", "stopall", "unsubscribe", "cancel", "end", "quit"})
OPT_IN_WORDS = frozenset({"start", "unstop"})
OPT_OUT_REPLY = "【常州经开区反诈中心】您已退订，将不再收到反诈提醒短信。回复START可重新订阅。"
OPT_IN_REPLY = "【常州经开区反诈中心】您已重新订阅反诈提醒短信。回T退订。"
#: the truthful answer when the number is not in the registry: nothing was recorded either way
NOT_REGISTERED_REPLY = "【常州经开区反诈中心】本号码不在反诈提醒名单中，未作任何登记。"
REPORT_SIGNATURE_HEADER = "X-Dispatch-Signature"


def keyword(body: str) -> str | None:
    """``"opt_out"``, ``"opt_in"`` or None for the text of an inbound SMS."""
    word = body.strip().casefold()
    if word in OPT_OUT_WORDS:
        return "opt_out"
    if word in OPT_IN_WORDS:
        return "opt_in"
    return None


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (what Twilio posts), last value wins.

    Parsed here rather than with ``request.form()`` so the web process needs no
    multipart parser for the one encoding Twilio uses.
    """
    body = await request.body()  # at most DISPATCH_WEB_MAX_BODY bytes: guard.py cuts it off while reading
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def twiml(text: str | None) -> Response:
    reply = MessagingResponse()
    if text:
        reply.message(text)
    return Response(str(reply), media_type="application/xml")


def report_signature(secret: str, body: bytes) -> str:
    """What a provider puts in ``X-Dispatch-Signature``: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def routes(runtime: Runtime) -> list[Route]:
    settings = runtime.settings

    async def twilio_form(request: Request) -> dict[str, str] | None:
        """The form fields of a request Twilio signed, or None when the signature does not hold."""
        signature = request.headers.get("X-Twilio-Signature", "")
        if not signature or not settings.twilio_auth_token or not settings.public_url:
            return None
        params = await form_fields(request)
        url = settings.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if not RequestValidator(settings.twilio_auth_token).validate(url, params, signature):
            return None
        return params

    async def twilio_status(request: Request) -> Response:
        params = await twilio_form(request)
        if params is None:
            log.warning("webhook.forged", endpoint="twilio.status")
            return Response("signature check failed", status_code=403)
        sid = params.get("MessageSid") or params.get("SmsSid") or ""
        status = params.get("MessageStatus") or params.get("SmsStatus") or ""
        error = params.get("ErrorCode") or None
        changes = await run_in_threadpool(
            runtime.store.apply_status,
            sid,
            status,
            error_code=f"twilio.{error}" if error else None,
            actor="twilio",
        )
        log.info("webhook.status", provider_id=sid, status=status, changed=len(changes))
        return Response(status_code=204)

    async def twilio_inbound(request: Request) -> Response:
        params = await twilio_form(request)
        if params is None:
            log.warning("webhook.forged", endpoint="twilio.inbound")
            return Response("signature check failed", status_code=403)
        phone = params.get("From", "").strip()
        action = keyword(params.get("Body", ""))
        if action is None or not phone:
            return twiml(None)
        known = await run_in_threadpool(runtime.store.set_opted_out, phone, action == "opt_out")
        log.info("webhook.inbound", action=action, phone=mask(phone), in_registry=known)
        if not known:
            return twiml(NOT_REGISTERED_REPLY)
        return twiml(OPT_OUT_REPLY if action == "opt_out" else OPT_IN_REPLY)

    async def http_report(request: Request) -> Response:
        body = await request.body()
        secret = settings.http_report_secret
        given = request.headers.get(REPORT_SIGNATURE_HEADER, "")
        expected = report_signature(secret, body).encode("ascii")
        if not secret or not hmac.compare_digest(given.encode("utf-8", "replace"), expected):
            log.warning("webhook.forged", endpoint="http.report")
            return Response("signature check failed", status_code=403)
        try:
            data: Any = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        reports = data if isinstance(data, list) else data.get("reports", [data]) if isinstance(data, dict) else []
        changed = 0
        for item in reports:
            if not isinstance(item, dict):
                continue
            provider_id = str(item.get("message_id") or item.get("id") or "")
            status = str(item.get("status") or "")
            code = item.get("error_code")
            changes = await run_in_threadpool(
                runtime.store.apply_status,
                provider_id,
                status,
                error_code=f"http.{code}" if code else None,
                actor="http",
            )
            changed += len(changes)
        log.info("webhook.report", reports=len(reports), changed=changed)
        return JSONResponse({"reports": len(reports), "changed": changed})

    return [
        Route("/webhooks/twilio/status", twilio_status, methods=["POST"]),
        Route("/webhooks/twilio/inbound", twilio_inbound, methods=["POST"]),
        Route("/webhooks/http/report", http_report, methods=["POST"]),
    ]
