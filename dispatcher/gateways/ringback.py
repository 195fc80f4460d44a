"""Ringback-tone adapters (反电诈彩铃): enrol a number with the warning tone for a window, restore it after.

A ringback campaign does not send a message; it changes what callers of a number
hear. ``enrol`` makes the change and returns what must be kept to undo it;
``restore`` undoes it with what was kept. Both are idempotent: enrolling twice
wraps nothing twice, restoring twice puts back the same thing.

Adapters (``DISPATCH_RINGBACK_GATEWAY``):

- ``outbox``: one JSON line per action in ``ringback.jsonl`` beside the SMS outbox (demos, drills);
- ``twilio-announce``: numbers hosted on Twilio; the number's voice URL is pointed at our
  ``/twiml/ringback/{campaign}`` (which says the warning and redirects to the kept URL) and put
  back at the end, through ``IncomingPhoneNumbers`` on the same client as the SMS adapter;
- ``carrier-http``: a carrier's ringback platform, driven by a config file with an ``enrol``
  and a ``restore`` section, each written like the HTTP adapter's config.

Errors are the same ``SendError`` tree as for SMS, so the same retries, ``unknown``
handling and traces apply.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

from ..errors import ConfigError, PermanentSendError, SendError
from .base import OutgoingMessage
from .httptrace import collecting

if TYPE_CHECKING:
    import httpx

    from ..settings import Settings

RINGBACK_GATEWAYS = ("outbox", "twilio-announce", "carrier-http")


@dataclass(frozen=True)
class RingbackRequest:
    key: str  # idempotency key of the delivery row (enrol or restore run + phone)
    run_id: str
    campaign_id: str
    phone: str
    #: the warning as text (what a TTS says, or what the carrier's tone is described by)
    text: str
    start: datetime
    end: datetime
    #: restore only: what enrol kept
    kept: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RingbackResult:
    provider_id: str
    #: what restore needs to undo this enrolment (None: nothing to keep)
    kept: Mapping[str, Any] | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)


class RingbackGateway(Protocol):
    name: str

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        """Make callers of ``request.phone`` hear the warning; raise a ``SendError`` on failure."""
        ...

    def restore(self, request: RingbackRequest) -> RingbackResult:
        """Undo the enrolment with ``request.kept``; restoring what is already restored is fine."""
        ...

    def close(self) -> None: ...


def read_ringback_outbox(path: Path) -> Any:
    """Every complete line of the ringback outbox (same format rules as the SMS outbox)."""
    from .outbox import read_outbox

    return read_outbox(path)


class OutboxRingback:
    """Writes each action as one JSON line (flock, one write per line), like the SMS outbox."""

    name = "outbox"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, action: str, request: RingbackRequest) -> RingbackResult:
        record = {
            "action": action,
            "key": request.key,
            "run_id": request.run_id,
            "campaign_id": request.campaign_id,
            "to": request.phone,
            "text": request.text,
            "start": request.start.isoformat(),
            "end": request.end.isoformat(),
            "at": datetime.now(UTC).isoformat(),
        }
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
        finally:
            os.close(fd)
        return RingbackResult(provider_id=f"outbox:{action}:{request.key}", kept={"tone": "outbox"})

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        return self._append("enrol", request)

    def restore(self, request: RingbackRequest) -> RingbackResult:
        return self._append("restore", request)

    def close(self) -> None:
        return None


class TwilioAnnounce:
    """Numbers hosted on Twilio: a pre-connect announcement through the number's voice URL."""

    name = "twilio-announce"

    def __init__(self, sms: Any, public_url: str) -> None:
        #: a ``TwilioGateway``: same client, HTTP client, redaction and error table
        self.sms = sms
        self.public_url = public_url.rstrip("/")

    def announce_url(self, campaign_id: str, then: str) -> str:
        return f"{self.public_url}/twiml/ringback/{quote(campaign_id)}?then={quote(then, safe='')}"

    def _ours(self, url: str | None) -> bool:
        return bool(url) and str(url).startswith(f"{self.public_url}/twiml/ringback/")

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        from twilio.base.exceptions import TwilioException

        from .twilio import classify

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
        from twilio.base.exceptions import TwilioException

        from .twilio import classify

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


class CarrierHttpRingback:
    """A carrier's ringback platform: two config-driven HTTP calls (``enrol`` and ``restore`` sections)."""

    name = "carrier-http"

    def __init__(self, enrol: Any, restore: Any) -> None:
        self.enrol_gateway = enrol
        self.restore_gateway = restore

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


def create_ringback(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    extra_headers: Callable[[str, str, Mapping[str, Any] | None], Mapping[str, str]] | None = None,
) -> RingbackGateway:
    """The ringback adapter ``DISPATCH_RINGBACK_GATEWAY`` names."""
    name = settings.ringback_gateway
    if name == "outbox":
        return OutboxRingback(settings.outbox_path.with_name("ringback.jsonl"))
    if name == "twilio-announce":
        from .twilio import TwilioGateway

        sms = TwilioGateway(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            from_=settings.twilio_from or "announce-only",
            messaging_service_sid=settings.twilio_messaging_service_sid,
            public_url=settings.public_url,
            base_url=settings.twilio_base_url,
            timeout=settings.gateway_timeout,
            transport=transport,
            extra_headers=extra_headers,
        )
        return TwilioAnnounce(sms, settings.public_url)
    if name == "carrier-http":
        from .http import HttpGateway, load_config

        if settings.ringback_config is None:
            raise ConfigError("DISPATCH_RINGBACK_CONFIG must name the carrier's ringback config file")
        enrol = load_config(settings.ringback_config, env=settings.gateway_secrets, section="enrol")
        restore = load_config(settings.ringback_config, env=settings.gateway_secrets, section="restore")
        return CarrierHttpRingback(
            HttpGateway(enrol, timeout=settings.gateway_timeout, transport=transport),
            HttpGateway(restore, timeout=settings.gateway_timeout, transport=transport),
        )
    raise ConfigError(
        f"DISPATCH_RINGBACK_GATEWAY: unknown ringback adapter {name!r} (known: {', '.join(RINGBACK_GATEWAYS)})"
    )
