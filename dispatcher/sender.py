"""Sending one batch: claim its pending rows, render, hand to the gateway, record every result.

This is the plain function the ``send_batch`` actor wraps. It is safe to run
twice for the same batch (Dramatiq delivers at least once): the claim takes only
rows still ``pending``, so a second delivery of the message finds nothing to do.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from . import metrics
from .batch import (
    DRILL_GATEWAY,
    RUNS,
    BatchResult,
    RunContext,
    channel_adapter,
    internal_message,
    is_drill,
    outcome_for,
    seconds_until,
    settled_outcome,
)
from .campaigns import parse_duration
from .channels import channel_of
from .errors import (
    AmbiguousSendError,
    GatewayDown,
    SendError,
    StoreError,
)
from .providers.base import Gateway, OutgoingMessage, SendResult
from .spool import record_durably, release_durably, replay
from .store import EXPIRED, SKIPPED, Claimed, Outcome

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.sender")


def gateway_of(runtime: Runtime, context: RunContext) -> Gateway:
    """The gateway a run sends through, as its channel says: an SMS run its campaign's ``gateways:`` list,
    else ``DISPATCH_GATEWAY`` (one adapter, or a failover list that looks like one); a voice run
    ``runtime.voice``."""
    return channel_of(context).gateway(runtime, context)


def _send_chunk(gateway: Any, messages: list[OutgoingMessage]) -> list[SendResult | SendError]:
    """The gateway's answers for a chunk; an adapter that raises something unexpected answers ``unknown``.

    An exception from inside an adapter cannot say whether the messages left, so each becomes
    an ambiguous result (``internal_error``), looked up before any resend; ``GatewayDown``
    (nothing handed over) goes up to stop the batch.
    """
    try:
        results = list(gateway.send_many(messages))
        if len(results) != len(messages):
            raise RuntimeError(f"gateway returned {len(results)} results for {len(messages)} messages")
        return results
    except (GatewayDown, SendError):
        raise
    except Exception as exc:  # an adapter bug must not strand the batch: classify every row of the chunk
        log.exception("gateway.internal_error", messages=len(messages))
        return [AmbiguousSendError(internal_message(exc), code="internal_error") for _ in messages]


def send_rows(runtime: Runtime, context: RunContext, rows: list[Claimed], gate: Gate | None = None) -> list[Outcome]:
    """Render and send already-claimed rows; returns the outcomes (not yet recorded).

    With a ``gate``, messages are handed over in small chunks paced by the shared rate
    limiter, and the gate is asked between chunks whether the run was paused or cancelled
    or the send window closed; rows not handed over then are left in ``gate.unsent``.
    """
    now = runtime.clock()
    channel = channel_of(context)
    gateway = channel.gateway(runtime, context)
    outcomes: list[Outcome] = []
    to_send: list[tuple[Claimed, OutgoingMessage]] = []

    def settled(row: Claimed, state: str, outcome: str, **fields: Any) -> Outcome:
        return settled_outcome(row, gateway.name, state, outcome, **fields)

    for row in rows:
        prepared = channel.prepare(context, row, now, gateway.name)
        if isinstance(prepared, Outcome):
            outcomes.append(prepared)
        else:
            to_send.append((row, prepared))
    if channel.capped:
        to_send = _apply_frequency_cap(runtime, context, to_send, outcomes, now)
    deadline = channel.deadline(context)
    if to_send and gate is None:
        results = _send_chunk(gateway, [m for _, m in to_send])
        for (row, message), result in zip(to_send, results, strict=True):
            outcomes.append(outcome_for(row, message, result, gateway.name, now, runtime.settings.max_attempts))
    elif to_send and gate is not None:
        index = 0
        while index < len(to_send):
            if gate.should_stop():
                gate.unsent = [row for row, _ in to_send[index:]]
                break
            chunk = to_send[index : index + gate.chunk]
            taken = gate.taken_away(chunk)
            if taken:
                # a resume or the watchdog judged this worker gone (it was frozen) and took these rows:
                # they are someone else's now, so they are not handed over from here
                log.warning("batch.claim_taken", rows=len(taken))
                to_send = [item for item in to_send if item[0].id not in taken]
                continue
            gate.pace(chunk)
            if deadline is not None and runtime.clock() > deadline:
                # the deadline passed while this batch was being paced: nothing more goes out
                for row, _ in to_send[index:]:
                    outcomes.append(settled(row, EXPIRED, "skipped", reason="send_by_passed"))
                break
            down: GatewayDown | None = None
            try:
                results = _send_chunk(gateway, [m for _, m in chunk])
            except GatewayDown as exc:
                # what the gateway took before it failed is recorded; the rest goes back to pending
                down, results = exc, exc.done
                chunk = chunk[: len(results)]
            gate.handed += len(chunk)
            sent_at = runtime.clock()
            attempts = runtime.settings.max_attempts
            for (row, message), result in zip(chunk, results, strict=True):
                outcomes.append(outcome_for(row, message, result, gateway.name, sent_at, attempts))
            index += len(chunk)
            if down is not None:
                gate.unsent = [row for row, _ in to_send[index:]]
                gate.stop_reason = "gateway_down"
                gate.down = str(down)
                break
    return outcomes


def _apply_frequency_cap(
    runtime: Runtime,
    context: RunContext,
    to_send: list[tuple[Claimed, OutgoingMessage]],
    outcomes: list[Outcome],
    now: datetime,
) -> list[tuple[Claimed, OutgoingMessage]]:
    """Skip (reason ``frequency_cap``) people who already had their bulk allowance this period.

    Counts bulk messages in ``sent``/``delivered`` across every run within the rolling period;
    urgent runs are neither capped nor counted.
    """
    if not to_send or context.priority != "bulk":
        return to_send
    cap = context.campaign.frequency_cap if context.campaign is not None else None
    limit = cap.max if cap is not None else runtime.settings.frequency_cap_max
    period = parse_duration(cap.per if cap is not None else runtime.settings.frequency_cap_period)
    if limit <= 0:
        return to_send
    residents = [row.resident_id for row, _ in to_send if row.resident_id is not None]
    counts = runtime.store.coordination.bulk_sends_since(residents, now - period, exclude_run=context.run_id)
    keep = []
    for row, message in to_send:
        if counts.get(row.resident_id or 0, 0) >= limit:
            outcomes.append(
                settled_outcome(row, gateway_of(runtime, context).name, SKIPPED, "skipped", reason="frequency_cap")
            )
        else:
            keep.append((row, message))
    return keep


class Gate:
    """Asked between chunks of a batch: may we go on, and when may the next chunk leave?

    The run's status is read at most every ``CHECK_EVERY`` seconds so that a pause or a
    cancel reaches every worker within a fraction of a second without a query per message.
    """

    CHECK_EVERY = 0.25

    def __init__(self, runtime: Runtime, context: RunContext, checked_at: float = 0.0) -> None:
        self.runtime = runtime
        self.context = context
        # the shared limiter paces the channels that reach people through the gateway (not ringback)
        self.limiter = runtime.rate_limiter if channel_of(context).paced else None
        self.chunk = self.chunk_size(runtime, gateway_of(runtime, context), paced=self.limiter is not None)
        self.unsent: list[Claimed] = []
        self.stop_reason: str | None = None
        #: why the gateway could take nothing more (disk full, ...), when stop_reason is gateway_down
        self.down: str | None = None
        #: messages handed to the gateway so far (a crash before the first leaves nothing to reconcile)
        self.handed = 0
        self._claim_checked = time.monotonic()
        #: when this batch's claim was last renewed (made just before the gate: the claim itself)
        self._claim_renewed = self._claim_checked
        #: rows the last renewal found still held (None: none yet), and rows a check found taken away;
        #: a row taken away never comes back under the same claim, so both stay true for the batch
        self._held: set[int] | None = None
        self._lost: set[int] = set()
        self.opens_at: datetime | None = None
        #: when the run's status and window were last read (``time.monotonic``; 0: never, read at the first look)
        self._checked = checked_at

    @staticmethod
    def chunk_size(runtime: Runtime, gateway: Gateway, *, paced: bool) -> int:
        """Messages handed over at once between two looks at the gate (pause, cancel, window, claims).

        A chunk is what the gateway keeps in flight at once (``concurrency``; whole calls' worth for a
        gateway that takes many numbers in one call), so a worker waits on the provider's round trip
        once per chunk, not once per message. Paced, the chunk's tokens are taken as a whole before it
        leaves (``Gate.pace``), so the limiter still bounds the average rate; a chunk is then also no
        larger than a second's worth of the rate, so a burst stays within one second's allowance (any one
        second sees at most a chunk more than the rate). A gateway that sends one at a time is paced one
        message at a time, every single send spaced.
        """
        if not paced:
            return max(20, gateway.batch_capacity, gateway.concurrency)
        per_second = max(1, int(runtime.settings.rate_limit))
        return max(gateway.batch_capacity, min(gateway.concurrency, per_second))

    def should_stop(self) -> bool:
        if self.stop_reason is not None:
            return True
        if self.runtime.stopping.is_set():
            # the worker is shutting down: hand out nothing more, the rest goes back to pending
            self.stop_reason = "shutdown"
            return True
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY:
            return False
        self._checked = now
        try:
            status = self.runtime.store.control.run_status(self.context.run_id)
        except StoreError as exc:
            # the log is unreachable for a moment: keep sending, the results are recorded (or spooled) after
            log.warning("batch.status_unreadable", error=str(exc))
            return False
        if status in ("paused", "cancelled"):
            self.stop_reason = status
            return True
        self.opens_at = window_opening(self.runtime, self.context)
        if self.opens_at is not None:
            self.stop_reason = "send_window"
            return True
        return False

    def taken_away(self, chunk: list[tuple[Claimed, OutgoingMessage]]) -> set[int]:
        """Rows of the chunk no longer held under their claim, asked of the log at most every ``CHECK_EVERY``.

        A worker frozen (SIGSTOP, a stalled VM) or cut off past its heartbeat may come back to find
        its rows reconciled and re-queued: handing them over then would send those people twice.

        Once a third of ``worker_stale_after`` has passed since the claim was last renewed, the check
        renews it (one UPDATE over every row the batch still holds): the leader's requeue is fenced on
        ``claimed_at``, so for each row either the renewal or the requeue wins, never both. Measured
        from the last renewal, this also renews at the first check after any gap long enough for the
        leader to have judged this worker dead (a freeze, a network cut). In between, a read suffices:
        a claim renewed within a third of the window is not listed as an orphan (``orphans`` wants it
        a whole window old), so nobody can be requeueing it. What the last renewal and checks found
        taken away answers for the chunks between checks, so a chunk right after one that was taken
        away is not handed over unchecked.

        A renewal that cannot be written (the log unreachable) is retried until it is: past the
        third of the window, the rows may be the leader's, and only the log can say.
        """
        now = time.monotonic()
        ids = [row.id for row, _ in chunk]
        if now - self._claim_checked >= self.CHECK_EVERY:
            self._claim_checked = now
            store, token = self.runtime.store, chunk[0][0].claim_token
            if token is None:
                return set()  # rows not taken under a claim (none are, from claim()): nothing to fence on
            if now - self._claim_renewed >= self.runtime.settings.worker_stale_after / 3:
                held = self._renew(token)
                if held is None:
                    return set(ids)  # shutting down before the log answered: hand nothing more over
                self._held, self._claim_renewed = held, now
            else:
                # unreadable for a moment: fine, the claim was renewed within a third of the window
                with contextlib.suppress(StoreError):
                    self._lost |= set(ids) - store.still_claimed(ids, token)
        return {i for i in ids if i in self._lost or (self._held is not None and i not in self._held)}

    def _renew(self, token: str) -> set[int] | None:
        """The batch's rows still held after renewing its claim; None if the worker stops first."""
        warned = False
        while True:
            try:
                return self.runtime.store.renew_claim(self.context.run_id, token) or set()
            except StoreError as exc:
                # a failed renewal may also have lost to the leader's requeue (PostgreSQL aborts one of
                # two transactions locking the same rows in opposite orders): asked again, the rows say
                if not warned:
                    log.warning("batch.claim_unrenewed", error=str(exc))
                    warned = True
            if self.runtime.stopping.wait(self.CHECK_EVERY):
                return None

    def pace(self, chunk: list[tuple[Claimed, OutgoingMessage]]) -> None:
        if self.limiter is None:
            return
        per_parts = self.runtime.settings.rate_unit == "parts"
        metrics.rate_waited(self.limiter.acquire(sum(m.parts for _, m in chunk) if per_parts else len(chunk)))


def window_opening(runtime: Runtime, context: RunContext) -> datetime | None:
    """When the run may next hand something over (its channel's readiness: the SMS and call hours,
    a ringback campaign's window start), or None if it may now."""
    return channel_of(context).opens_at(runtime, context)


def _window_delay(runtime: Runtime, opens_at: datetime) -> float:
    """Seconds to defer a batch: until the opening, but never longer than the recheck cap."""
    return min(runtime.settings.window_recheck, max(0.05, (opens_at - runtime.clock()).total_seconds()))


def _not_a_drill(runtime: Runtime, context: RunContext) -> bool:
    """A run made unapproved as a drill, reaching a worker whose gateway is real (its DISPATCH_GATEWAY
    differs from the creating command's): halted, nothing sent, until its version is approved and resumed."""
    gateways = context.campaign.gateways if context.campaign is not None else None
    name = channel_adapter(runtime, context.channel, gateways)
    if is_drill(name):
        return False
    if context.version is not None:
        approved = runtime.store.approvals.state(context.campaign_id, context.version).current
        if approved is not None and approved.approved_by:
            return False  # approved since it was made: `dispatch resume` let it through
    why = (
        f"made as a drill on the {DRILL_GATEWAY} gateway, but this worker sends through {name}: "
        f"approve the campaign's version (dispatch approvals), then `dispatch resume {context.run_id}`"
    )
    if runtime.store.control.halt_run(context.run_id, why):
        log.error("run.halted", run_id=context.run_id, reason=why)
    return True


def process_batch(runtime: Runtime, run_id: str, batch_no: int) -> BatchResult:
    """Send what is pending in one batch of one run and record it; return when to retry, if needed."""
    store = runtime.store
    # results an earlier attempt could not write go in first (fenced, so replaying is harmless)
    replay(runtime)
    context = RUNS.get(runtime, run_id)
    if context.drill and _not_a_drill(runtime, context):
        return BatchResult(0, {"parked": 1}, None)
    if runtime.stopping.is_set():
        # shutting down: claim nothing; the message goes back to the queue for another worker
        return BatchResult(0, {"stopping": 1}, 0.0)
    looked = time.monotonic()
    status = store.control.run_status(run_id)
    if status in ("cancelled", "completed"):
        return BatchResult(0, {}, None)
    with structlog.contextvars.bound_contextvars(run_id=run_id, campaign_id=context.campaign_id, batch=batch_no):
        if status == "paused":
            # parked: the rows stay pending and `dispatch resume` re-enqueues every pending batch
            log.info("batch.parked", reason="paused")
            return BatchResult(0, {"parked": 1}, None)
        opens_at = window_opening(runtime, context)
        if opens_at is not None:
            # outside the send window: neither sent nor dropped, the message comes back at the opening
            log.info("batch.deferred", reason="send_window", opens_at=opens_at.isoformat())
            return BatchResult(0, {"deferred": 1}, _window_delay(runtime, opens_at))
        started = time.monotonic()
        rows = store.claim(run_id, batch_no, runtime.worker_id)
        if not rows:
            log.debug("batch.nothing_to_claim")
            retry_at = store.next_retry_at(run_id, batch_no)
            return BatchResult(0, {}, seconds_until(runtime, retry_at))
        token = rows[0].claim_token
        # the status and the send window were read just before the claim: the gate's next look is due
        # CHECK_EVERY from then, like every look after it
        gate = Gate(runtime, context, checked_at=looked)
        try:
            outcomes = send_rows(runtime, context, rows, gate)
        except BaseException:
            log.exception("batch.crashed", claimed=len(rows))
            if not gate.handed:
                # nothing reached the gateway: the claim goes back rather than waiting for the watchdog
                release_durably(runtime, [r.id for r in rows], token)
            raise
        # never return (ack the message) before the results are in the log: retried, spooled meanwhile
        record_durably(runtime, outcomes)
        metrics.batch_done(
            outcomes, lane=context.priority, campaign=context.campaign_id, channel=channel_of(context).name,
            started=started,
        )  # fmt: skip
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        stop_in: float | None = None
        if gate.unsent:
            counts["stopped"] = len(gate.unsent)
            unsent_ids = [r.id for r in gate.unsent]
            if gate.stop_reason == "cancelled":
                store.control.cancel_claimed(unsent_ids, actor=runtime.worker_id, token=token)
            else:
                # paused, stopping, gateway down or window closed: back to pending, the attempt not counted
                store.release(unsent_ids, token)
                if gate.stop_reason == "gateway_down":
                    why = f"the gateway cannot take messages: {gate.down}"
                    store.control.halt_run(run_id, why)
                    log.error("run.halted", reason=why)
                elif gate.stop_reason == "shutdown":
                    stop_in = 0.0
                elif gate.stop_reason == "send_window" and gate.opens_at is not None:
                    stop_in = _window_delay(runtime, gate.opens_at)
                elif store.control.run_status(run_id) == "running":
                    # resumed while this batch was stopping: resume found none of these rows
                    # pending, so this batch must come back by itself
                    stop_in = 0.0
            log.info("batch.stopped", reason=gate.stop_reason, unsent=len(gate.unsent))
        log.info("batch.done", claimed=len(rows), **counts)
        # rows of this batch postponed by this or an earlier attempt: come back when the first is due,
        # even if every row claimed this time was settled (later retries must not be stranded)
        retry_at, still_open = store.batch_left(run_id, batch_no)
        if not still_open:
            store.finish_if_done(run_id)
        retry_in = seconds_until(runtime, retry_at)
        if stop_in is not None:
            retry_in = stop_in if retry_in is None else min(retry_in, stop_in)
        return BatchResult(len(rows), counts, retry_in)
