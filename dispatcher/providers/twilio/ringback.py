"""``twilio-announce``: ringback for numbers hosted on Twilio, as a pre-connect announcement.

The number's voice URL is pointed at our ``/twiml/ringback/{campaign}`` (which says
the warning and redirects to the kept URL, see ``twiml.py``) and put back at the
end, through ``IncomingPhoneNumbers`` on the same client as the SMS adapter. Both
are idempotent: enrolling twice wraps nothing twice, restoring twice puts back the
same thing. Errors go through the SMS adapter's one error table (``classify``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from twilio.base.exceptions import TwilioException

from ...errors import PermanentSendError, SendError
from ..base import RingbackRequest, RingbackResult
from ..httptrace import collecting
from .gateway import classify


class TwilioAnnounce:
    """Numbers hosted on Twilio: a pre-connect announcement through the number's voice URL."""

    name = "twilio-announce"
    #: two calls per number (find it, then update it): one number at a time
    concurrency = 1

    def __init__(self, sms: Any, public_url: str) -> None:
        #: a ``TwilioGateway``: same client, HTTP client, redaction and error table
        self.sms = sms
        self.public_url = public_url.rstrip("/")

    def announce_url(self, campaign_id: str, then: str) -> str:
        return f"{self.public_url}/twiml/ringback/{quote(campaign_id)}?then={quote(then, safe='')}"

    def _ours(self, url: str | None) -> bool:
        return bool(url) and str(url).startswith(f"{self.public_url}/twiml/ringback/")

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        with collecting() as trace:
            try:
                numbers = self.sms.client.incoming_phone_numbers.list(phone_number=request.phone, limit=1)
                if not numbers:
                    error: SendError = PermanentSendError(
                        "the number is not hosted on this Twilio account", code="twilio.not_hosted"
                    )
                    error.trace = list(trace)
                    raise error
                number = numbers[0]
                kept_url = number.voice_url or ""  # "" = the number had no voice URL
                kept_method = number.voice_method or "POST"
                if self._ours(kept_url):
                    # enrolled already (a retry after an ambiguous reply): keep what the first enrolment kept
                    then = parse_qs(urlsplit(kept_url).query).get("then", [""])[0]
                    kept = {"sid": str(number.sid), "voice_url": then, "voice_method": kept_method}
                    return RingbackResult(str(number.sid), kept, list(trace))
                self.sms.client.incoming_phone_numbers(number.sid).update(
                    voice_url=self.announce_url(request.campaign_id, kept_url), voice_method="POST"
                )
            except TwilioException as exc:
                error = classify(exc)
                error.trace = list(trace)
                raise error from exc
        kept = {"sid": str(number.sid), "voice_url": kept_url, "voice_method": kept_method}
        return RingbackResult(str(number.sid), kept, list(trace))

    def restore(self, request: RingbackRequest) -> RingbackResult:
        kept = dict(request.kept or {})
        with collecting() as trace:
            try:
                sid = kept.get("sid")
                if not sid or "voice_url" not in kept:
                    # nothing kept (the enrolment's reply was lost): read the number, undo only our own URL
                    numbers = self.sms.client.incoming_phone_numbers.list(phone_number=request.phone, limit=1)
                    if not numbers:
                        error: SendError = PermanentSendError(
                            "the number is not hosted on this Twilio account", code="twilio.not_hosted"
                        )
                        error.trace = list(trace)
                        raise error
                    sid = numbers[0].sid
                    current = numbers[0].voice_url or ""
                    if not self._ours(current):
                        return RingbackResult(str(sid), None, list(trace))
                    kept = {
                        "voice_url": parse_qs(urlsplit(current).query).get("then", [""])[0],
                        "voice_method": numbers[0].voice_method or "POST",
                    }
                # always put the kept URL back: idempotent, and one call whatever happened in between.
                # Twilio's schema refuses an empty VoiceUrl, so a number that had none is pointed at our
                # /twiml/unrouted, which rejects the call as a number without a voice URL does.
                self.sms.client.incoming_phone_numbers(sid).update(
                    voice_url=kept.get("voice_url") or f"{self.public_url}/twiml/unrouted",
                    voice_method=kept.get("voice_method") or "POST",
                )
            except TwilioException as exc:
                error = classify(exc)
                error.trace = list(trace)
                raise error from exc
        return RingbackResult(str(sid), None, list(trace))

    def close(self) -> None:
        self.sms.close()
