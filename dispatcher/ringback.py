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

import threading
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from .batch import internal_message
from .errors import AmbiguousSendError, GatewayDown, SendError
from .providers.base import (
    BaseGateway,
    Handover,
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


_handovers: weakref.WeakKeyDictionary[Any, Handover] = weakref.WeakKeyDictionary()
_handovers_lock = threading.Lock()


def _handover(adapter: RingbackGateway) -> Handover:
    """The adapter's pool of concurrent calls: one per adapter, so ``concurrency`` bounds the process."""
    with _handovers_lock:
        found = _handovers.get(adapter)
        if found is None:
            found = _handovers[adapter] = Handover(adapter.concurrency, f"ringback-{adapter.name}")
        return found


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
        #: chunks as large as the adapter's concurrent calls (the sender's ``Gate``)
        self.concurrency = adapter.concurrency
        self.store = store
        self.restoring = restoring
        self.enrol_run_id = enrol_run_id
        self.start = start
        self.end = end

    def _request(self, message: OutgoingMessage) -> RingbackRequest:
        return RingbackRequest(
            key=message.key,
            run_id=message.run_id,
            campaign_id=message.campaign_id,
            phone=message.to,
            text=message.body,
            start=self.start,
            end=self.end,
            kept=self.store.ringback.ringback_kept(self.enrol_run_id, message.to) if self.restoring else None,
        )

    def _call(self, request: RingbackRequest) -> RingbackResult:
        """The adapter's enrol or restore of one number; a bug for one number answers that number only."""
        try:
            return self.adapter.restore(request) if self.restoring else self.adapter.enrol(request)
        except (SendError, GatewayDown):
            raise
        except Exception as exc:  # an adapter bug must not take the other numbers of the chunk with it
            log.exception("ringback.internal_error")
            raise AmbiguousSendError(internal_message(exc), code="internal_error") from exc

    def _result(self, message: OutgoingMessage, done: RingbackResult) -> SendResult:
        if not self.restoring:
            self.store.ringback.keep_ringback(message.run_id, message.to, done.provider_id, done.kept)
        return SendResult(
            provider_id=done.provider_id, status="restored" if self.restoring else "enrolled", trace=done.trace
        )

    def send(self, message: OutgoingMessage) -> SendResult:
        return self._result(message, self._call(self._request(message)))

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """The adapter's calls ``concurrency`` at a time (one ``Handover`` per adapter, shared by the
        worker's threads), each number answered on its own: an adapter that raises something
        unexpected for one number leaves that row ``unknown`` (done again on resume: enrol and restore
        are idempotent), not its whole chunk. The store is read before the calls and written after
        them, from this thread: a number enrolled but not yet kept is in ``sending``, enrolled again."""
        requests = [self._request(m) for m in messages]
        try:
            answers = _handover(self.adapter).run(self._call, requests)
        except GatewayDown as exc:
            kept = self._keep(messages, exc.done)
            raise GatewayDown(str(exc), done=kept) from exc
        return self._keep(messages, answers)

    def _keep(
        self, messages: Sequence[OutgoingMessage], answers: Sequence[RingbackResult | SendError]
    ) -> list[SendResult | SendError]:
        return [
            answer if isinstance(answer, SendError) else self._result(message, answer)
            for message, answer in zip(messages, answers, strict=False)
        ]

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        return {}

    def close(self) -> None:
        return None  # the adapter belongs to the runtime
