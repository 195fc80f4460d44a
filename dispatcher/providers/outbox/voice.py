"""The outbox voice adapter (``DISPATCH_VOICE_GATEWAY=outbox``): one JSON line per call, no call placed.

For drills: each call is a line in the SMS outbox file with ``"channel": "voice"`` and what would be
said (``text``), written under the same lock and whole-line rules as the SMS outbox, and looked up
there after a crash. Nothing answers a drill, so a row ends ``sent`` with the provider id
``outbox-voice:<key>``; an answer or a key press can be played into ``dispatch web`` as the signed
webhooks a real provider would send.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import SendError
from ..base import LookupRequest, MessageStatus, OutgoingMessage, SendResult
from .gateway import OutboxGateway, encode_json


class OutboxVoice(OutboxGateway):
    name = "outbox-voice"
    #: nothing reports on a drill call: its ``sent`` is where it ends
    can_fetch_status = False

    def _line(self, message: OutgoingMessage, at: str) -> bytes:
        record = {
            "channel": "voice",
            "key": message.key,
            "run_id": message.run_id,
            "campaign_id": message.campaign_id,
            "delivery_id": message.delivery_id,
            "to": message.to,
            "text": message.body,
            "at": at,
        }
        return (encode_json(record) + "\n").encode("utf-8")

    def send(self, message: OutgoingMessage) -> SendResult:
        result = super().send(message)
        return SendResult(provider_id=result.provider_id.replace("outbox:", "outbox-voice:", 1), status="queued")

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        return [
            SendResult(provider_id=r.provider_id.replace("outbox:", "outbox-voice:", 1), status="queued")
            if isinstance(r, SendResult)
            else r
            for r in super().send_many(messages)
        ]

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        return {key: SendResult(provider_id=f"outbox-voice:{key}", status="queued") for key in super().lookup(requests)}

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        return {}
