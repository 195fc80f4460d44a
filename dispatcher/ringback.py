"""Ringback-tone campaigns: enrol every eligible number for the window, restore every one at its end.

A ringback campaign (``channel: ringback``, ``window: {start, end}``) runs through the
same delivery log as SMS: ``dispatch run`` creates the *enrol* run (one row per
resident, opted-out people ``skipped``), and its batches go through the one batch
skeleton (``sender.process_batch``) with the ringback channel (``channels.py``), whose
gateway is ``RingbackSends`` here. At the window's end ``restore`` creates a *restore*
run (channel ``ringback-restore``) whose rows are every number the enrol run may have
changed, and processes it the same way. So both steps get the same claims, retries with
backoff, ``unknown`` on ambiguous replies, per-attempt traces, ledger events, idempotency
keys, pause/cancel between chunks and durable recording as a send.

Rules:
- a number opted out is never enrolled (checked at run creation and again at claim);
- enrolment does not start before the window and never retries past its end;
- restore does not depend on the enrol run's status: a cancelled campaign is restored too,
  and restoring is retried until the attempts are exhausted (then the row fails, visibly).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from .batch import internal_message
from .errors import AmbiguousSendError, GatewayDown, SendError
from .providers.base import (
    BaseGateway,
    LookupRequest,
    OutgoingMessage,
    RingbackGateway,
    RingbackRequest,
    RingbackResult,
    SendResult,
)
from .store import DELIVERED, SENDING, SENT, UNKNOWN

if TYPE_CHECKING:
    from .store import SqlStore

log = structlog.get_logger("dispatcher.ringback")

ENROL_CHANNEL = "ringback"
RESTORE_CHANNEL = "ringback-restore"
#: enrol-run states whose number may have been changed and so must be restored
MAY_BE_ENROLLED = (SENT, DELIVERED, UNKNOWN, SENDING)
_NOBODY = {"name": "", "district": "", "grid": ""}


def announcement_text(context: Any) -> str:
    """The warning callers hear: who speaks and the campaign's text, without brackets or the SMS opt-out."""
    composer = context.composer
    return composer.signature.strip("【】") + "提醒您：" + composer.body(_NOBODY)


def restore_reason(enrol_run_id: str) -> str:
    """The reason recorded on the restore run of an enrol run: how the restore run is found again."""
    return f"restore of {enrol_run_id}"


class RingbackSends(BaseGateway):
    """The ringback adapter seen as a gateway, so enrol and restore go through the one batch skeleton.

    Each message is one number: enrolment keeps what the adapter changed (``keep_ringback``, first
    write wins) for the restore run, and restore hands back what the enrolment kept. Both are
    idempotent at the adapter, so a row found in ``sending`` or ``unknown`` is simply done again
    (``runs.reconcile_orphans``): there is nothing to look up.
    """

    can_lookup = False

    def __init__(
        self,
        adapter: RingbackGateway,
        store: SqlStore,
        *,
        restoring: bool,
        enrol_run_id: str,
        start: datetime,
        end: datetime,
    ) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.store = store
        self.restoring = restoring
        self.enrol_run_id = enrol_run_id
        self.start = start
        self.end = end

    def send(self, message: OutgoingMessage) -> SendResult:
        request = RingbackRequest(
            key=message.key,
            run_id=message.run_id,
            campaign_id=message.campaign_id,
            phone=message.to,
            text=message.body,
            start=self.start,
            end=self.end,
            kept=self.store.ringback.ringback_kept(self.enrol_run_id, message.to) if self.restoring else None,
        )
        if self.restoring:
            done: RingbackResult = self.adapter.restore(request)
        else:
            done = self.adapter.enrol(request)
            self.store.ringback.keep_ringback(message.run_id, message.to, done.provider_id, done.kept)
        return SendResult(
            provider_id=done.provider_id, status="restored" if self.restoring else "enrolled", trace=done.trace
        )

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """One number at a time; an adapter that raises something unexpected for one number leaves that
        row ``unknown`` (done again on resume: enrol and restore are idempotent), not its whole chunk."""
        results: list[SendResult | SendError] = []
        for message in messages:
            try:
                results.append(self.send(message))
            except SendError as exc:
                results.append(exc)
            except GatewayDown as exc:
                raise GatewayDown(str(exc), done=results) from exc
            except Exception as exc:  # an adapter bug must not take the other numbers of the chunk with it
                log.exception("ringback.internal_error")
                results.append(AmbiguousSendError(internal_message(exc), code="internal_error"))
        return results

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        return {}

    def close(self) -> None:
        return None  # the adapter belongs to the runtime
