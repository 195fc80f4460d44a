"""The HTTP adapter's delivery reports: ``POST /webhooks/http/report``, signed over the raw body.

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

from ..base import DeliveryReports

if TYPE_CHECKING:
    from ...settings import Settings

log = structlog.get_logger("dispatcher.providers.http.webhooks")

REPORT_SIGNATURE_HEADER = "X-Dispatch-Signature"


def report_signature(secret: str, body: bytes) -> str:
    """What a provider puts in ``X-Dispatch-Signature``: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def routes(reports: DeliveryReports, settings: Settings) -> list[BaseRoute]:
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
        items = data if isinstance(data, list) else data.get("reports", [data]) if isinstance(data, dict) else []
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

    return [Route("/webhooks/http/report", http_report, methods=["POST"])]
