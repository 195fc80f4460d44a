"""Kannel's ``smsbox`` sendsms interface: one GET per message, delivery reports on a URL we give it.

The request (``GET /cgi-bin/sendsms``) carries ``username``, ``password``, ``to``,
``text``, ``charset=UTF-8`` and, for Chinese text, ``coding=2`` (UCS-2); we ask for
final delivery reports only (``dlr-mask=19``: 1 delivered, 2 not delivered to the
phone, 16 not delivered to the SMSC) on ``/webhooks/kannel/dlr``, with our own id
and an HMAC of it in the URL, because Kannel signs nothing it sends back. Kannel
substitutes ``%d`` with the report type.

Kannel's answers, classified in one table (``classify``): ``0: Accepted for
delivery`` and ``3: Queued for later delivery`` are hand-overs; a 403 (bad
credentials) or another 4xx is permanent; a 503 ``Sending failed`` /
``Temporal failure`` means smsbox queued nothing, so it is retried; any other
answer, a read timeout or a success status with an unreadable body may have
queued the SMS and leaves the row ``unknown``. Kannel offers no way to ask what it
took (``can_lookup = False``): such rows wait for an operator, as with the HTTP adapter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

import httpx

from ...errors import (
    AmbiguousSendError,
    ConfigError,
    PermanentSendError,
    RetryableSendError,
    SendError,
    UnavailableSendError,
)
from ..base import BaseGateway, LookupRequest, OutgoingMessage, SendResult
from ..httptrace import TracedHttp, collecting
from ..redaction import REDACTED, Redactor

DLR_PATH = "/webhooks/kannel/dlr"
#: final states only: 1 delivered to the phone, 2 not delivered to the phone, 16 not delivered to the SMSC
DLR_MASK = 19
#: the answers of smsbox that mean Kannel took the message
ACCEPTED_PREFIXES = ("0:", "3:")
_SIG_RE = re.compile(r"(sig(?:=|%3D))[0-9a-f]{64}", re.IGNORECASE)


class _KannelRedactor(Redactor):
    """Also hides the DLR URL's HMAC: whoever reads a trace must not be able to forge that message's report."""

    def text(self, value: str) -> str:
        return _SIG_RE.sub(lambda m: m.group(1) + REDACTED, super().text(value))


def dlr_signature(secret: str, provider_id: str) -> str:
    """What the DLR URL carries so a report for ``provider_id`` can be believed: hex HMAC-SHA256."""
    return hmac.new(secret.encode("utf-8"), provider_id.encode("utf-8"), hashlib.sha256).hexdigest()


def classify(status: int, answer: str) -> SendError | None:
    """The one mapping from smsbox's reply to our error tree; None when Kannel took the message."""
    text = answer.strip()
    if 200 <= status < 300:
        if text.startswith(ACCEPTED_PREFIXES):
            return None
        return AmbiguousSendError(f"unexpected answer from Kannel (HTTP {status})", code="kannel.bad_provider_response")
    if status == 403:
        return PermanentSendError("Kannel refused the sendsms credentials", code="kannel.auth")
    if status == 503:
        # smsbox could not hand the message to bearerbox: nothing is queued, an explicit "not accepted"
        return UnavailableSendError(f"Kannel could not queue the message: {text[:80]}", code="kannel.503")
    if 400 <= status < 500:
        return PermanentSendError(f"Kannel rejected the request (HTTP {status}): {text[:80]}", code=f"kannel.{status}")
    return AmbiguousSendError(f"HTTP {status} from Kannel", code=f"kannel.{status}")


class KannelGateway(BaseGateway):
    name = "kannel"
    #: smsbox cannot be asked whether it took a message
    can_lookup = False

    def __init__(
        self,
        *,
        sendsms_url: str,
        username: str,
        password: str,
        public_url: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not sendsms_url or not username or not password:
            raise ConfigError(
                "DISPATCH_HTTP_SECRET_KANNEL_URL, _USERNAME and _PASSWORD must be set for DISPATCH_GATEWAY=kannel"
            )
        if not public_url:
            raise ConfigError("DISPATCH_PUBLIC_URL must be set: Kannel posts delivery reports there")
        self.sendsms_url = sendsms_url
        self.username = username
        self.password = password
        self.dlr_base = public_url.rstrip("/") + DLR_PATH
        self.http = TracedHttp(redactor=_KannelRedactor([password]), timeout=timeout, transport=transport)

    def dlr_url(self, provider_id: str) -> str:
        query = httpx.QueryParams({"id": provider_id, "sig": dlr_signature(self.password, provider_id)})
        return f"{self.dlr_base}?{query}&type=%d"  # %d is Kannel's: the report type, substituted by smsbox

    def send(self, message: OutgoingMessage) -> SendResult:
        provider_id = f"kannel:{message.key}"
        params: dict[str, str | int] = {
            "username": self.username,
            "password": self.password,
            "to": message.to,
            "text": message.body,
            "charset": "UTF-8",
            "dlr-mask": DLR_MASK,
            "dlr-url": self.dlr_url(provider_id),
        }
        if message.encoding.upper().startswith("UCS"):
            params["coding"] = 2
        with collecting() as trace:
            try:
                response = self.http.request("GET", self.sendsms_url, params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # refused or unresolvable: smsbox never saw the request
                error: SendError = UnavailableSendError(
                    f"could not connect: {type(exc).__name__}", code="kannel.connect"
                )
                error.trace = list(trace)
                raise error from exc
            except httpx.PoolTimeout as exc:
                error = RetryableSendError(f"could not connect: {type(exc).__name__}", code="kannel.connect")
                error.trace = list(trace)
                raise error from exc
            except httpx.HTTPError as exc:
                error = AmbiguousSendError(f"no reply: {type(exc).__name__}", code="kannel.timeout")
                error.trace = list(trace)
                raise error from exc
        failure = classify(response.status_code, response.text)
        if failure is not None:
            failure.trace = list(trace)
            raise failure
        return SendResult(provider_id=provider_id, status="queued", trace=list(trace))

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        return {}

    def close(self) -> None:
        self.http.close()
