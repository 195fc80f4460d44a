"""``/webhooks/kannel/dlr``: Kannel's delivery reports, believed only with the HMAC we put in the DLR URL.

smsbox calls the URL the send gave it, with ``type`` substituted: 1 delivered to
the phone, 2 not delivered to the phone, 16 not delivered to the SMSC are final;
8 (delivered to the SMSC) and 4 (queued on the SMSC) say nothing final and change
nothing. Kannel expects any 2xx; it retries on errors.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ..base import DeliveryReports
from .gateway import DLR_PATH, dlr_signature

if TYPE_CHECKING:
    from ...settings import Settings

log = structlog.get_logger("dispatcher.providers.kannel.webhooks")

#: Kannel's DLR type -> our provider status word; types not listed (8, 4) are not final
DLR_STATES: dict[str, str] = {"1": "delivered", "2": "undelivered", "16": "failed"}


def routes(reports: DeliveryReports, settings: Settings, *, secret: str) -> list[BaseRoute]:
    async def dlr(request: Request) -> Response:
        provider_id = request.query_params.get("id", "")
        given = request.query_params.get("sig", "")
        if not secret or not provider_id or not hmac.compare_digest(given, dlr_signature(secret, provider_id)):
            log.warning("webhook.forged", endpoint="kannel.dlr")
            return Response("signature check failed", status_code=403)
        kind = request.query_params.get("type", "")
        status = DLR_STATES.get(kind)
        if status is None:
            return PlainTextResponse("ok")  # an intermediate report: nothing final to record
        error_code = None if status == "delivered" else f"kannel.dlr{kind}"
        changed = await run_in_threadpool(
            reports.apply_status, provider_id, status, error_code=error_code, actor="kannel"
        )
        log.info("webhook.report", endpoint="kannel.dlr", provider_id=provider_id, status=status, changed=changed)
        return PlainTextResponse("ok")

    return [Route(DLR_PATH, dlr, methods=["GET", "POST"])]
