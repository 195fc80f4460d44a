"""Kannel's ``smsbox`` sendsms interface: one GET per message, delivery reports on a URL we give it.

The request (``GET /cgi-bin/sendsms``) carries ``username``, ``password``, ``to``,
``text`` and ``charset=UTF-8``; Chinese text adds ``coding=2`` so smsbox sends it
as UCS-2 instead of mangling it into the GSM alphabet. We ask for every delivery
report type (``dlr-mask=31``: 1 delivered to the phone, 2 not delivered to the
phone, 4 buffered on the SMSC, 8 submitted to the SMSC, 16 rejected by the SMSC)
so that the intermediate ones show in the web log too, on ``dlr-url`` pointing at
``/webhooks/kannel/dlr`` with our provider id and a token derived from it, because
Kannel signs nothing it sends back. smsbox substitutes ``%d`` (report type) and
``%T`` (when the SMSC reported) in that URL; the numbers (``%p``/``%P``) are never
asked for: the id already finds the row, and a number in a URL ends up in logs.

Kannel's answers, classified in one table (``classify``): ``0: Accepted for
delivery`` and ``3: Queued for later delivery`` are hand-overs; ``Authorization
failed`` (403) and other 4xx are permanent; a 503 ``Sending failed`` /
``Temporal failure`` means smsbox queued nothing (an explicit "not accepted":
``UnavailableSendError``, so a failover list tries its next provider), so it is retried; any other
answer, a read timeout or a success status with an unreadable body may have
queued the SMS and leaves the row ``unknown``. A refused connection (or a connect
timeout) means smsbox is not there: nothing was taken, and nothing after it will
be, so the batch stops with ``GatewayDown`` instead of failing every row. Kannel
offers no way to ask what it took (``can_lookup = False``): ``unknown`` rows wait
for an operator, as with the HTTP adapter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from urllib.parse import unquote

import httpx

from ...errors import (
    AmbiguousSendError,
    ConfigError,
    GatewayDown,
    PermanentSendError,
    RetryableSendError,
    SendError,
    UnavailableSendError,
)
from ..base import BaseGateway, LookupRequest, OutgoingMessage, SendResult
from ..httptrace import TracedHttp, collecting
from ..redaction import REDACTED, Redactor

DLR_PATH = "/webhooks/kannel/dlr"
#: every report type: 1 delivered, 2 not delivered to the phone, 4 buffered, 8 SMSC submit, 16 SMSC reject
DLR_MASK = 1 + 2 + 4 + 8 + 16
#: the answers of smsbox that mean Kannel took the message
ACCEPTED_PREFIXES = ("0:", "3:")
#: shortest DISPATCH_KANNEL_DLR_SECRET accepted: it is all that stands between the DLR route and forged reports
MIN_DLR_SECRET = 16
_TOKEN_RE = re.compile(r"(token(?:=|%3D))[0-9a-f]{64}", re.IGNORECASE)


class _KannelRedactor(Redactor):
    """Also hides the DLR URL's token (whoever reads a trace must not be able to forge that message's report),
    and sees the number inside the DLR URL, which is a query value of the sendsms query: encoded twice."""

    def text(self, value: str) -> str:
        if "%25" in value:
            value = unquote(value)
        return _TOKEN_RE.sub(lambda m: m.group(1) + REDACTED, super().text(value))


def dlr_token(secret: str, provider_id: str) -> str:
    """What the DLR URL carries so a report for ``provider_id`` can be believed: hex HMAC-SHA256.

    One token per message: a DLR URL read from Kannel's logs lets nobody report on any other message.
    """
    return hmac.new(secret.encode("utf-8"), provider_id.encode("utf-8"), hashlib.sha256).hexdigest()


def classify(status: int, answer: str) -> SendError | None:
    """The one mapping from smsbox's reply to our error tree; None when Kannel took the message."""
    text = answer.strip()
    if 200 <= status < 300:
        if text.startswith(ACCEPTED_PREFIXES):
            return None
        return AmbiguousSendError(f"unexpected answer from Kannel (HTTP {status})", code="kannel.bad_provider_response")
    if status == 403 or text.startswith("Authorization failed"):
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
        dlr_secret: str,
        public_url: str,
        sender: str = "",
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not sendsms_url or not username or not password:
            raise ConfigError(
                "DISPATCH_KANNEL_URL, DISPATCH_KANNEL_USERNAME and DISPATCH_KANNEL_PASSWORD must be set "
                "for DISPATCH_GATEWAY=kannel"
            )
        if len(dlr_secret) < MIN_DLR_SECRET:
            raise ConfigError(
                f"DISPATCH_KANNEL_DLR_SECRET: at least {MIN_DLR_SECRET} characters, got {len(dlr_secret)} "
                "(it authenticates Kannel's delivery reports)"
            )
        if not public_url:
            raise ConfigError("DISPATCH_PUBLIC_URL must be set: Kannel calls the delivery-report URL there")
        self.sendsms_url = sendsms_url
        self.username = username
        self.password = password
        self.dlr_secret = dlr_secret
        self.sender = sender
        self.dlr_base = public_url.rstrip("/") + DLR_PATH
        self.http = TracedHttp(redactor=_KannelRedactor([password, dlr_secret]), timeout=timeout, transport=transport)

    def dlr_url(self, provider_id: str) -> str:
        """Our DLR route for one message; ``%d``/``%T`` are Kannel's escapes, substituted by smsbox.

        The id is percent-encoded ASCII, so every ``%`` of ours is followed by a hex digit 2-7,
        which Kannel does not read as an escape of its own.
        """
        query = httpx.QueryParams({"id": provider_id, "token": dlr_token(self.dlr_secret, provider_id)})
        return f"{self.dlr_base}?{query}&type=%d&at=%T"

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
        if self.sender:
            params["from"] = self.sender
        if message.encoding.upper().startswith("UCS"):
            params["coding"] = 2
        with collecting() as trace:
            try:
                response = self.http.request("GET", self.sendsms_url, params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise GatewayDown(f"Kannel's smsbox cannot be reached: {type(exc).__name__}") from exc
            except httpx.PoolTimeout as exc:
                # our own connection pool was full: nothing left this process
                error: SendError = RetryableSendError(f"no free connection: {type(exc).__name__}", code="kannel.pool")
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
