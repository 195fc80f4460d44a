"""The HTTP adapters' delivery reports: ``POST /webhooks/http/report`` (SMS) and ``/webhooks/http/voice/report``
(calls), signed over the raw body.

A call report is ``{"call_id": ..., "status": ..., "digits": ...}`` (or a list of them, or
``{"reports": [...]}``): the status is a call status word (``CALL_STATUSES``: answered ->
delivered; busy, no-answer, failed, canceled -> failed), ``digits`` what the listener pressed
(1 confirms).

A report is believed only when ``X-Dispatch-Signature`` is ``sha256=`` + the hex
HMAC-SHA256 of the raw body with ``DISPATCH_HTTP_REPORT_SECRET``; otherwise 403 and
nothing changes. A report signed with this secret only moves rows this provider
sent (``actor="http"``): one provider's key must not rewrite another's results.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..base import CALL_STATUSES, DeliveryReports

if TYPE_CHECKING:
    from ...settings import Settings

log = structlog.get_logger("dispatcher.providers.http.webhooks")

REPORT_SIGNATURE_HEADER = "X-Dispatch-Signature"


def report_signature(secret: str, body: bytes) -> str:
    """What a provider puts in ``X-Dispatch-Signature``: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _signed_items(secret: str, body: bytes, given: str) -> list[Any] | None:
    """The report items of a body signed with ``secret``; None when the signature does not hold."""
    expected = report_signature(secret, body).encode("ascii")
    if not secret or not hmac.compare_digest(given.encode("utf-8", "replace"), expected):
        return None
    data: Any = json.loads(body)  # ValueError: the caller answers 400
    return data if isinstance(data, list) else data.get("reports", [data]) if isinstance(data, dict) else []


def routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
    async def signed_items(request: Request, endpoint: str) -> list[Any] | Response:
        body = await request.body()
        try:
            items = _signed_items(settings.http_report_secret, body, request.headers.get(REPORT_SIGNATURE_HEADER, ""))
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if items is None:
            log.warning("webhook.forged", endpoint=endpoint)
            return Response("signature check failed", status_code=403)
        return items

    async def http_report(request: Request) -> Response:
        items = await signed_items(request, "http.report")
        if isinstance(items, Response):
            return items
        changed = 0
        for item in items:
            if not isinstance(item, dict):
                continue
            provider_id = str(item.get("message_id") or item.get("id") or "")
            status = str(item.get("status") or "")
            code = item.get("error_code")
            changed += await run_in_threadpool(
                reports.apply_status, provider_id, status, error_code=f"http.{code}" if code else None, actor="http"
            )
        log.info("webhook.report", reports=len(items), changed=changed)
        return JSONResponse({"reports": len(items), "changed": changed})

    async def voice_report(request: Request) -> Response:
        items = await signed_items(request, "http.voice_report")
        if isinstance(items, Response):
            return items
        changed = confirmed = 0
        for item in items:
            if not isinstance(item, dict):
                continue
            call_id = str(item.get("call_id") or item.get("message_id") or item.get("id") or "")
            word, code = CALL_STATUSES.get(str(item.get("status") or "").strip().lower(), (None, None))
            if call_id and word is not None:
                changed += await run_in_threadpool(reports.apply_status, call_id, word, error_code=code, actor="http")
            digits = str(item.get("digits") or "").strip()
            if call_id and digits:
                pressed = await run_in_threadpool(reports.key_press, None, digits, call_sid=call_id, actor="http")
                confirmed += pressed == "confirmed"
        log.info("webhook.call_report", reports=len(items), changed=changed, confirmed=confirmed)
        return JSONResponse({"reports": len(items), "changed": changed, "confirmed": confirmed})

    return [
        Route("/webhooks/http/report", http_report, methods=["POST"]),
        Route("/webhooks/http/voice/report", voice_report, methods=["POST"]),
    ]
