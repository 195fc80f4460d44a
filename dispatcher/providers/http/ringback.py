"""``carrier-http``: a carrier's ringback platform, driven by a config file.

The file (``DISPATCH_RINGBACK_CONFIG``) has an ``enrol`` and a ``restore`` section,
each written like the HTTP adapter's config; errors are the same ``SendError`` tree
as for SMS, so the same retries, ``unknown`` handling and traces apply.
"""

from __future__ import annotations

from typing import Any

from ..base import OutgoingMessage, RingbackRequest, RingbackResult


class CarrierHttpRingback:
    """A carrier's ringback platform: two config-driven HTTP calls (``enrol`` and ``restore`` sections)."""

    name = "carrier-http"

    def __init__(self, enrol: Any, restore: Any, *, concurrency: int = 1) -> None:
        self.enrol_gateway = enrol
        self.restore_gateway = restore
        #: numbers enrolled or restored at once (DISPATCH_GATEWAY_CONCURRENCY): the carrier's platform
        #: answers each call after a round trip, like an SMS provider
        self.concurrency = concurrency

    @staticmethod
    def _message(request: RingbackRequest) -> OutgoingMessage:
        return OutgoingMessage(
            key=request.key,
            run_id=request.run_id,
            campaign_id=request.campaign_id,
            to=request.phone,
            body=request.text,
            parts=1,
            encoding="UCS-2",
            send_by=request.end,
        )

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        result = self.enrol_gateway.send(self._message(request))
        return RingbackResult(result.provider_id, {"carrier_id": result.provider_id}, result.trace)

    def restore(self, request: RingbackRequest) -> RingbackResult:
        result = self.restore_gateway.send(self._message(request))
        return RingbackResult(result.provider_id, None, result.trace)

    def close(self) -> None:
        self.enrol_gateway.close()
        self.restore_gateway.close()
