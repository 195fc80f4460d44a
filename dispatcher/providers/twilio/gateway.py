"""Twilio SMS adapter (``DISPATCH_GATEWAY=twilio``): the real ``twilio`` client over our own HTTP client.

Why our own ``HttpClient``: the default one has no timeout and cannot be pointed at
a regional edge or a local Twilio peer, and it would not leave a trace. Ours runs
on a pooled ``httpx.Client`` (connection reuse, connect/read timeouts, an
injectable transport for tests), rewrites ``https://api.twilio.com`` to
``DISPATCH_TWILIO_BASE_URL`` when set, and records every exchange, redacted, on
the current attempt (``httptrace``).

Every failure is classified in one place, ``classify``, from one table
(``TWILIO_CODES``): Twilio's own error semantics decide whether the row is
retried, failed, failed-and-opted-out, or left ``unknown`` for reconciliation.
Twilio processes nothing on a 429 and a refused connection sends nothing, so both
are retried (a refused or unresolvable connection is ``UnavailableSendError``: a
failover gateway may hand the message to its next provider); a 5xx or a read
timeout may have queued the SMS, so the row goes to ``unknown`` and ``lookup``
asks Twilio for messages to that number since the attempt before anything is sent
again. So does a success status whose body is not Twilio's JSON or carries no ``sid``
(``twilio.bad_provider_response``).

``fetch_status`` fetches each message by its SID (``GET .../Messages/{Sid}.json``),
for rows whose status callback never came; a SID Twilio does not know (404) is left
out of the answer.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http import HttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

from ...clock import utcnow
from ...errors import (
    AmbiguousSendError,
    ConfigError,
    PermanentSendError,
    RetryableSendError,
    SendError,
    UnavailableSendError,
)
from ...redact import scrub
from ..base import BaseGateway, LookupRequest, MessageStatus, OutgoingMessage, SendResult
from ..httptrace import TracedHttp, collecting
from ..redaction import Redactor

#: Twilio accepts a ValidityPeriod of 1..36000 seconds
MAX_VALIDITY = 36000

#: Twilio error code -> what it means for the row. One table, read by ``classify`` only.
#: retry: nothing was processed, send again after backoff; permanent: fail now;
#: opt_out: fail now and record that the recipient opted out.
TWILIO_CODES: dict[int, str] = {
    20429: "retry",  # too many requests: never processed
    21611: "retry",  # the From number's queue is full: try later
    21211: "permanent",  # invalid 'To' number
    21614: "permanent",  # 'To' is not a mobile number
    21606: "permanent",  # 'From' cannot send to this number
    21608: "permanent",  # unverified number (trial account)
    21612: "permanent",  # cannot route to this number
    21610: "opt_out",  # the recipient replied STOP
}


class TransportFailure(TwilioException):
    """An exchange that got no HTTP reply; ``sent`` says whether the request may have reached Twilio."""

    def __init__(self, message: str, *, sent: bool, unreachable: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        #: no connection could be made at all (refused, name not resolved, connect timeout)
        self.unreachable = unreachable


class DispatchHttpClient(HttpClient):
    """``twilio.http.HttpClient`` on a pooled, traced ``httpx.Client`` with timeouts and a movable base."""

    def __init__(
        self,
        *,
        redactor: Redactor,
        base_url: str = "",
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
        max_connections: int = 20,
    ) -> None:
        super().__init__(logging.getLogger("dispatcher.twilio.http"), is_async=False, timeout=timeout)
        self.base_url = base_url.rstrip("/")
        # thread-safe: the gateway's send threads share it; every request's state is local to the call
        self.http = TracedHttp(redactor=redactor, timeout=timeout, transport=transport, max_connections=max_connections)
        #: headers to add per request (tests use it to select Prism examples with ``Prefer``)
        self.extra_headers = extra_headers

    def _url(self, url: str) -> str:
        if self.base_url:
            parts = urlsplit(url)
            if parts.netloc.endswith("twilio.com"):
                return self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")
        return url

    def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        url = self._url(uri)
        all_headers = dict(headers or {})
        if self.extra_headers is not None:
            all_headers.update(self.extra_headers(method, url, data))
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            all_headers["Authorization"] = f"Basic {token}"
        kwargs: dict[str, Any] = {"headers": all_headers, "params": params or None}
        if data:
            if all_headers.get("Content-Type", "").endswith("json"):
                kwargs["json"] = data
            else:
                kwargs["data"] = data
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self.http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # refused, unresolvable or unanswered before a byte of the request left: Twilio took nothing
            raise TransportFailure(
                f"could not connect to Twilio: {type(exc).__name__}", sent=False, unreachable=True
            ) from exc
        except httpx.PoolTimeout as exc:
            # our own pool was busy: nothing was sent, but Twilio is not shown to be down either
            raise TransportFailure(f"could not connect to Twilio: {type(exc).__name__}", sent=False) from exc
        except httpx.HTTPError as exc:
            # read timeouts, resets after the request went out: Twilio may have acted on it
            raise TransportFailure(f"no reply from Twilio: {type(exc).__name__}", sent=True) from exc
        return TwilioResponse(response.status_code, response.text, response.headers)

    def close(self) -> None:
        self.http.close()


def classify(exc: TwilioException) -> SendError:
    """The one mapping from a Twilio failure to our error tree (see ``TWILIO_CODES``)."""
    if isinstance(exc, TransportFailure):
        if exc.sent:
            return AmbiguousSendError(str(exc), code="twilio.timeout")
        if exc.unreachable:
            return UnavailableSendError(str(exc), code="twilio.connect")
        return RetryableSendError(str(exc), code="twilio.connect")
    status = getattr(exc, "status", None)
    if isinstance(exc, TwilioRestException | TwilioServiceException) and isinstance(status, int):
        raw_code = getattr(exc, "code", None)
        code = int(raw_code) if raw_code else None
        label = f"twilio.{code}" if code else f"twilio.http{status}"
        # Twilio's messages can quote the number ("The 'To' number +86... is not valid") or echo the
        # request (account SID, Authorization header): scrub both before the text is kept anywhere
        text = getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None)
        message = scrub(str(text or f"HTTP {status}"))
        kind = TWILIO_CODES.get(code) if code else None
        if kind == "retry" or (kind is None and status == 429):
            return RetryableSendError(message, code=label)
        if kind == "opt_out":
            return PermanentSendError(message, code=label, opt_out=True)
        if kind == "permanent":
            return PermanentSendError(message, code=label)
        if status >= 500:
            return AmbiguousSendError(message, code=label)
        return PermanentSendError(message, code=label)
    # anything else the client raised: we cannot tell whether Twilio acted, so look it up before resending
    return AmbiguousSendError(scrub(f"{type(exc).__name__}: {exc}"), code="twilio.client")


@contextmanager
def twilio_call(what: str) -> Iterator[list[dict[str, Any]]]:
    """One call to Twilio, its HTTP exchanges collected; what it raises becomes our error, carrying them.

    A success status whose body is not Twilio's JSON (a proxy's page, a truncated reply) surfaces
    from the library as ValueError/TypeError/AttributeError/KeyError: the request reached Twilio,
    so the answer is ambiguous, never a clean failure.
    """
    with collecting() as trace:
        try:
            yield trace
        except TwilioException as exc:
            error = classify(exc)
            error.trace = list(trace)
            raise error from exc
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            error = bad_response(f"the reply to a {what} is not Twilio's JSON: {type(exc).__name__}")
            error.trace = list(trace)
            raise error from exc


def bad_response(message: str) -> SendError:
    """A reply we cannot read after the request reached Twilio: like a 5xx, the SMS may have gone out."""
    return AmbiguousSendError(message, code="twilio.bad_provider_response")


class TwilioGateway(BaseGateway):
    name = "twilio"
    can_fetch_status = True

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_: str = "",
        messaging_service_sid: str = "",
        public_url: str = "",
        base_url: str = "",
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
        clock: Callable[[], datetime] | None = None,
        concurrency: int = 1,
    ) -> None:
        if not account_sid or not auth_token:
            raise ConfigError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set for DISPATCH_GATEWAY=twilio")
        if not (from_ or messaging_service_sid):
            raise ConfigError("set TWILIO_FROM or TWILIO_MESSAGING_SERVICE_SID for DISPATCH_GATEWAY=twilio")
        if not public_url:
            raise ConfigError("DISPATCH_PUBLIC_URL must be set: Twilio posts delivery status callbacks there")
        self.clock = clock or utcnow
        self.from_ = from_
        self.messaging_service_sid = messaging_service_sid
        self.status_callback = f"{public_url.rstrip('/')}/webhooks/twilio/status"
        # the Basic blob is what an echoed request shows: neither the SID nor the token appears in it literally
        basic = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
        self.redactor = Redactor([auth_token, account_sid, basic])
        self.http_client = DispatchHttpClient(
            redactor=self.redactor,
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            extra_headers=extra_headers,
            # one keep-alive connection per request in flight, and the pool's default for the rest
            max_connections=max(20, concurrency),
        )
        self.client = Client(account_sid, auth_token, http_client=self.http_client)
        # ``send_many`` keeps up to ``concurrency`` messages in flight (DISPATCH_GATEWAY_CONCURRENCY)
        self.drive_concurrently(concurrency)

    def _validity(self, message: OutgoingMessage) -> int | None:
        """Seconds Twilio may keep the message queued: never beyond the campaign's ``send_by``."""
        if message.send_by is None:
            return None
        seconds = int((message.send_by - self.clock()).total_seconds())
        return max(1, min(MAX_VALIDITY, seconds))

    def send(self, message: OutgoingMessage) -> SendResult:
        params: dict[str, Any] = {
            "to": message.to,
            "body": message.body,
            "status_callback": self.status_callback,
        }
        if self.messaging_service_sid:
            params["messaging_service_sid"] = self.messaging_service_sid
        else:
            params["from_"] = self.from_
        validity = self._validity(message)
        if validity is not None:
            params["validity_period"] = validity
        with twilio_call("send") as trace:
            created = self.client.messages.create(**params)
        if not isinstance(created.sid, str) or not created.sid:
            # accepted, but with nothing to look the message up by: it may go out, so never resend blindly
            error = bad_response("Twilio accepted the message but its reply carries no sid")
            error.trace = list(trace)
            raise error
        return SendResult(provider_id=created.sid, status=str(created.status or "queued"), trace=list(trace))

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        """Which of these messages Twilio holds: messages to that number created since the attempt.

        A message matches when it went to the same number, was created no earlier than
        a minute before the attempt started (clock skew), and carries the same text when
        the text is known. Twilio's ``DateSent`` filter works on whole days, so the
        minute-level check is done here.
        """
        found: dict[str, SendResult] = {}
        for request in requests:
            # one page is enough: recent messages come first, and following pages costs calls
            kwargs: dict[str, Any] = {"to": request.to, "page_size": 50}
            if request.since is not None:
                kwargs["date_sent_after"] = request.since - timedelta(days=1)
            with twilio_call("lookup") as trace:
                messages = list(self.client.messages.page(**kwargs))
            earliest = request.since - timedelta(minutes=1) if request.since else None
            for m in messages:
                if m.to != request.to or (m.direction and not str(m.direction).startswith("outbound")):
                    continue
                created = m.date_created if isinstance(m.date_created, datetime) else None
                if earliest is not None and created is not None and created < earliest:
                    continue
                if request.body and m.body and m.body != request.body:
                    continue
                if not isinstance(m.sid, str) or not m.sid:
                    continue  # nothing to record it by: never store "None" as a provider id
                found[request.key] = SendResult(provider_id=str(m.sid), status=str(m.status), trace=list(trace))
                break
        return found

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        """Each message's current status, fetched by SID; SIDs Twilio answers 404 for are left out."""
        found: dict[str, MessageStatus] = {}
        for sid in provider_ids:
            with twilio_call("status fetch") as trace:
                try:
                    message = self.client.messages(sid).fetch()
                except TwilioRestException as exc:
                    if exc.status != 404:
                        raise
                    continue  # not Twilio's (or deleted): nothing to learn about it
            status = getattr(message, "status", None)
            if not status:
                continue
            code = getattr(message, "error_code", None)
            found[sid] = MessageStatus(str(status), error_code=f"twilio.{code}" if code else None, trace=list(trace))
        return found

    def close(self) -> None:
        super().close()  # the in-flight sends finish before their client goes
        self.http_client.close()
