"""``/webhooks/kannel/dlr``: Kannel's delivery reports, believed only with the token we put in the DLR URL.

smsbox calls the URL the send gave it, with ``type`` (``%d``) and ``at`` (``%T``,
the SMSC's time of the report) substituted. Kannel cannot sign a request, so the
URL itself carries the proof: an HMAC of the provider id under
``DISPATCH_KANNEL_DLR_SECRET``, compared in constant time.

Report types are bits: 1 delivered to the phone, 2 not delivered to the phone and
16 rejected by the SMSC are final; 4 (buffered on the SMSC) and 8 (submitted to
the SMSC) say nothing final and change nothing. A final report goes through the
store's ``apply_status`` as actor ``kannel``: it moves only rows Kannel sent, only
forward, with one ledger event per change. Kannel only wants a 2xx back.
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
from .gateway import DLR_PATH, dlr_token

if TYPE_CHECKING:
    from ...settings import Settings

log = structlog.get_logger("dispatcher.providers.kannel.webhooks")

#: Kannel's final DLR bits -> our provider status word, first match wins; 4 and 8 are not final
DLR_FINAL: tuple[tuple[int, str], ...] = ((1, "delivered"), (2, "undelivered"), (16, "failed"))


def final_status(kind: str) -> str | None:
    """The status word a report type means, None for intermediate (or unreadable) types."""
    try:
        bits = int(kind)
    except ValueError:
        return None
    return next((status for bit, status in DLR_FINAL if bits & bit), None)


def routes(reports: DeliveryReports, settings: Settings, *, secret: str) -> list[BaseRoute]:
    async def dlr(request: Request) -> Response:
        provider_id = request.query_params.get("id", "")
        given = request.query_params.get("token", "")
        expected = dlr_token(secret, provider_id) if secret and provider_id else ""
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("webhook.forged", endpoint="kannel.dlr")
            return Response("token check failed", status_code=403)
        kind = request.query_params.get("type", "")
        status = final_status(kind)
        if status is None:
            log.info("webhook.report", endpoint="kannel.dlr", provider_id=provider_id, type=kind, final=False)
            return PlainTextResponse("ok")
        error_code = None if status == "delivered" else f"kannel.dlr{kind}"
        changed = await run_in_threadpool(
            reports.apply_status, provider_id, status, error_code=error_code, actor="kannel"
        )
        log.info(
            "webhook.report",
            endpoint="kannel.dlr",
            provider_id=provider_id,
            type=kind,
            status=status,
            reported_at=request.query_params.get("at", ""),
            changed=changed,
        )
        return PlainTextResponse("ok")

    return [Route(DLR_PATH, dlr, methods=["GET", "POST"])]
