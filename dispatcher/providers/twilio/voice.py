"""Twilio voice adapter (``DISPATCH_VOICE_GATEWAY=twilio``): one call per delivery through the Calls API.

Built on the SMS adapter (``TwilioGateway``): the same client over our traced HTTP client, the
same redaction, and the same one error table (``twilio_call`` / ``classify``): a 429 is retried,
a 5xx or read timeout leaves the row ``unknown`` and ``lookup`` lists calls to that number since
the attempt before anything is placed again.

A call (``POST .../Calls.json``) fetches its TwiML from our ``/twiml/voice/{delivery}`` (the
warning in Mandarin, said twice inside a ``<Gather>`` asking the listener to press 1, see
``twiml.py``) and reports answered/completed to ``/webhooks/twilio/voice/status``
(``webhooks.py``). The URLs name the delivery row, never the number; Twilio signs each request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx

from ...errors import ConfigError
from ..base import LookupRequest, MessageStatus, OutgoingMessage, SendResult
from .gateway import TwilioGateway, bad_response, twilio_call

#: seconds Twilio lets the phone ring before it gives up (``no-answer``)
RING_TIMEOUT = 30
#: the call events we want to hear of: ``answered`` moves the row to delivered as soon as someone picks
#: up; the final status (completed, busy, no-answer, failed, canceled) comes with ``completed``
STATUS_EVENTS = ("answered", "completed")


class TwilioVoice(TwilioGateway):
    name = "twilio-voice"
    can_fetch_status = True

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_: str,
        public_url: str,
        base_url: str = "",
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
        clock: Callable[[], datetime] | None = None,
        status_events: Sequence[str] = STATUS_EVENTS,
    ) -> None:
        if not from_:
            raise ConfigError("set TWILIO_FROM (a voice-capable number) for DISPATCH_VOICE_GATEWAY=twilio")
        super().__init__(
            account_sid=account_sid,
            auth_token=auth_token,
            from_=from_,
            public_url=public_url,
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            extra_headers=extra_headers,
            clock=clock,
        )
        self.public_url = public_url.rstrip("/")
        #: sent as one ``StatusCallbackEvent`` field per event, as Twilio wants; none: Twilio's default
        #: (``completed`` only, which still carries every final status)
        self.status_events = list(status_events)
        self.status_callback = f"{self.public_url}/webhooks/twilio/voice/status"

    def twiml_url(self, delivery_id: int) -> str:
        return f"{self.public_url}/twiml/voice/{delivery_id}"

    def send(self, message: OutgoingMessage) -> SendResult:
        if message.delivery_id is None:
            raise ValueError("a voice call needs its delivery row's id for its TwiML URL")
        params: dict[str, Any] = {
            "to": message.to,
            "from_": self.from_,
            "url": self.twiml_url(message.delivery_id),
            "method": "POST",
            "status_callback": self.status_callback,
            "status_callback_method": "POST",
            "timeout": RING_TIMEOUT,
        }
        if self.status_events:
            params["status_callback_event"] = self.status_events
        with twilio_call("call") as trace:
            call = self.client.api.v2010.account.calls.create(**params)
            sid = call.sid
        if not isinstance(sid, str) or not sid:
            error = bad_response("Twilio accepted the call but its reply carries no sid")
            error.trace = list(trace)
            raise error
        return SendResult(provider_id=sid, status=str(call.status or "queued"), trace=list(trace))

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        """Which of these calls Twilio placed: outbound calls to that number started since the attempt."""
        found: dict[str, SendResult] = {}
        for request in requests:
            kwargs: dict[str, Any] = {"to": request.to, "page_size": 50}
            if request.since is not None:
                kwargs["start_time_after"] = request.since - timedelta(days=1)
            with twilio_call("call lookup") as trace:
                calls = list(self.client.api.v2010.account.calls.page(**kwargs))
            earliest = request.since - timedelta(minutes=1) if request.since else None
            for c in calls:
                if c.to != request.to or (c.direction and not str(c.direction).startswith("outbound")):
                    continue
                created = c.date_created if isinstance(c.date_created, datetime) else None
                if earliest is not None and created is not None and created < earliest:
                    continue
                if not isinstance(c.sid, str) or not c.sid:
                    continue
                found[request.key] = SendResult(provider_id=c.sid, status=str(c.status), trace=list(trace))
                break
        return found

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        """Each call's current status (Twilio's word: ``completed``, ``busy``, ...), fetched by SID."""
        from twilio.base.exceptions import TwilioRestException

        found: dict[str, MessageStatus] = {}
        for sid in provider_ids:
            with twilio_call("call status fetch") as trace:
                try:
                    call = self.client.api.v2010.account.calls(sid).fetch()
                except TwilioRestException as exc:
                    if exc.status != 404:
                        raise
                    continue
            if call.status:
                found[sid] = MessageStatus(str(call.status), trace=list(trace))
        return found
