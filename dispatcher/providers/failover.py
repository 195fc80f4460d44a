"""An ordered list of SMS gateways that behaves as one: provider failover without double sends.

``DISPATCH_GATEWAY=twilio,http`` (or a campaign's ``gateways:`` list) makes the runtime
build a ``FailoverGateway`` over those adapters; it is registered nowhere, so the
sender sees one ``Gateway`` and stays as simple as with a single provider.

A message moves to the next provider only when the one before it *proved* it took
nothing: ``UnavailableSendError`` (connection refused, name not resolved, an explicit
"not accepted") or ``GatewayDown`` (the outbox could not be written, whole lines or
nothing). Any other answer is final for that message, above all an ambiguous one
(timeout, 5xx after the request went out, a connection reset mid-request): that
message keeps the provider it was handed to and follows the ``unknown`` path, looked
up by ``resume`` before anything is sent again, so nobody is sent twice through two
providers.

Each provider has a ``CircuitBreaker``: a failure that proves the provider took nothing
opens it, and while it is open messages go straight to the next provider; after the
cool-down one message is a probe (half-open) and its answer closes or re-opens it.
Breakers live in the worker process (the runtime keeps one per provider name, shared
by every list that names it): each process finds out for itself, after at most one
refused connection, that a provider is down, which costs nothing but that connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import structlog

from .. import metrics
from ..errors import GatewayDown, SendError, UnavailableSendError
from .base import Gateway, LookupRequest, MessageStatus, OutgoingMessage, SendResult

log = structlog.get_logger("dispatcher.failover")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

#: what a member proving it took nothing is recorded as on the attempt log
REFUSED = "refused"
#: error code of a provider passed over because its breaker is open (no call was made to it)
CIRCUIT_OPEN = "failover.circuit_open"


class CircuitBreaker:
    """Closed -> open on a failure that proves the provider took nothing -> half-open after ``cooldown``
    seconds, when one message probes it -> closed when the provider answers, open again when it refuses.

    Only ``failed`` opens it; any answer from the provider (sent, a permanent refusal of that one
    number, a rate limit) shows it is up and closes it. An ambiguous answer proves neither: a probe
    that gets one leaves the breaker half-open for the next message to probe.
    """

    def __init__(
        self,
        name: str,
        *,
        cooldown: float,
        threshold: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.name = name
        self.cooldown = cooldown
        self.threshold = max(1, threshold)
        self.clock = clock
        self.on_change = on_change
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown:
                return HALF_OPEN
            return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self.cooldown - (self.clock() - self._opened_at))

    def allow(self) -> str | None:
        """``closed``: send; ``probe``: send one message to test the provider; None: pass it over."""
        with self._lock:
            if self._state == CLOSED:
                return CLOSED
            if self._probing:
                return None
            if self._state == OPEN and self.clock() - self._opened_at < self.cooldown:
                return None
            self._state = HALF_OPEN
            self._probing = True
        self._changed(HALF_OPEN, "cool-down over: the next message probes the provider")
        return "probe"

    def succeeded(self) -> None:
        with self._lock:
            was = self._state
            self._state, self._failures, self._probing = CLOSED, 0, False
        if was != CLOSED:
            self._changed(CLOSED, "the provider answered")

    def failed(self, code: str) -> None:
        with self._lock:
            self._failures += 1
            opening = self._state == HALF_OPEN or (self._state == CLOSED and self._failures >= self.threshold)
            if opening or self._state == OPEN:
                # a refusal that was in flight when another thread opened it restarts the cool-down
                self._state, self._opened_at = OPEN, self.clock()
            self._probing = False
        if opening:
            self._changed(OPEN, code)

    def released(self) -> None:
        """A probe whose answer proves neither way: the next message probes again."""
        with self._lock:
            self._probing = False

    def _changed(self, state: str, why: str) -> None:
        event = {
            OPEN: "gateway.circuit_opened",
            HALF_OPEN: "gateway.circuit_half_open",
            CLOSED: "gateway.circuit_closed",
        }
        method = log.error if state == OPEN else log.warning
        method(event[state], gateway=self.name, why=why, cooldown=self.cooldown)
        metrics.circuit_changed(self.name, state)
        if self.on_change is not None:
            self.on_change(self.name, state, why)


class FailoverGateway:
    """Several gateways, tried in order per message; a message moves on only when refused for sure.

    Each result says which provider took the message (``SendResult.gateway`` /
    ``SendError.gateway``) and which providers proved first that they took nothing
    (``refusals``): the delivery row's ``gateway`` column and the attempt log hold both.
    """

    name = "failover"

    def __init__(
        self,
        members: Sequence[Gateway],
        breakers: Mapping[str, CircuitBreaker],
        *,
        on_failover: Callable[[str, str, int], None] | None = None,
    ) -> None:
        if len(members) < 2:
            raise ValueError("a failover gateway needs at least two providers")
        self.members = list(members)
        self.breakers = breakers
        self.on_failover = on_failover
        #: ``unknown`` rows can be looked up only if every provider can say what it took
        self.can_lookup = all(m.can_lookup for m in self.members)
        self.batch_capacity = max(m.batch_capacity for m in self.members)
        #: chunks sized for the most concurrent member: each member bounds its own requests in flight
        self.concurrency = max(m.concurrency for m in self.members)
        #: a list is never asked as one: the delivery-report sweep asks each row's status of the
        #: provider that took it (the row's ``gateway``), whichever list it was sent through
        self.can_fetch_status = False

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def send(self, message: OutgoingMessage) -> SendResult:
        result = self.send_many([message])[0]
        if isinstance(result, SendError):
            raise result
        return result

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        results: list[SendResult | SendError | None] = [None] * len(messages)
        notes: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(messages))}
        last: dict[int, SendError] = {}
        waiting = list(range(len(messages)))
        previous: str | None = None
        for member in self.members:
            if not waiting:
                break
            breaker = self.breakers[member.name]
            if previous is not None:
                # every message moved on is also on the attempt log (``refusals``) and counted in ``status``
                log.info("gateway.failover", from_gateway=previous, to_gateway=member.name, messages=len(waiting))
                metrics.failed_over(previous, member.name, len(waiting))
                if self.on_failover is not None:
                    self.on_failover(previous, member.name, len(waiting))
            previous = member.name
            mode = breaker.allow()
            if mode is None:
                for i in waiting:
                    notes[i].append(_skipped(member.name, breaker))
                continue
            # the first message alone: a refusal then spares the rest the same wait, and a probe tests one message
            head, tail = waiting[:1], waiting[1:]
            left = self._through(member, breaker, messages, head, results, notes, last)
            if tail and (left or breaker.state != CLOSED):
                for i in tail:
                    notes[i].append(_skipped(member.name, breaker))
                waiting = left + tail
                continue
            waiting = left + (self._through(member, breaker, messages, tail, results, notes, last) if tail else [])
        for i in waiting:
            # nobody took it: retried after backoff, through whichever provider is up by then
            error = last.get(i) or UnavailableSendError(
                "every gateway of the failover list is unavailable",
                code=CIRCUIT_OPEN,
                retry_after=min(self.breakers[m.name].retry_in() for m in self.members) or None,
            )
            error.refusals = notes[i]
            results[i] = error
        return [r for r in results if r is not None]

    def _through(
        self,
        member: Gateway,
        breaker: CircuitBreaker,
        messages: Sequence[OutgoingMessage],
        indexes: list[int],
        results: list[SendResult | SendError | None],
        notes: dict[int, list[dict[str, Any]]],
        last: dict[int, SendError],
    ) -> list[int]:
        """Hand ``indexes`` to ``member``; record final answers; return the ones it proved it did not take."""
        try:
            answers: list[SendResult | SendError] = list(member.send_many([messages[i] for i in indexes]))
        except GatewayDown as exc:
            # whole lines or nothing: what it took is in ``done``, the rest never reached it
            down = UnavailableSendError(str(exc), code=f"{member.name}.down")
            answers = [*exc.done, *[down] * (len(indexes) - len(exc.done))]
        except UnavailableSendError as exc:
            answers = [exc] * len(indexes)
        if len(answers) != len(indexes):
            raise RuntimeError(f"gateway {member.name} returned {len(answers)} results for {len(indexes)} messages")
        refused: list[int] = []
        answered = ambiguous = False
        for i, answer in zip(indexes, answers, strict=True):
            if isinstance(answer, SendError):
                answer = _own(answer)  # adapters may answer a whole call with one error object
            if isinstance(answer, UnavailableSendError):
                refused.append(i)
                last[i] = answer
                notes[i].append(
                    {
                        "gateway": member.name,
                        "error_code": answer.code,
                        "error_message": answer.message,
                        "trace": list(answer.trace),
                    }
                )
                continue
            if isinstance(answer, SendResult):
                answered = True
                results[i] = replace(answer, gateway=member.name, refusals=tuple(notes[i]))
            else:
                ambiguous = ambiguous or answer.ambiguous
                answered = answered or not answer.ambiguous
                answer.gateway = member.name
                answer.refusals = notes[i]
                results[i] = answer
        if refused:
            breaker.failed(last[refused[0]].code)
        elif answered:
            breaker.succeeded()
        elif ambiguous:
            breaker.released()
        return refused

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        """What any of the providers took, by key, each result naming the provider that has it."""
        found: dict[str, SendResult] = {}
        for member in self.members:
            wanted = [r for r in requests if r.key not in found]
            if not wanted:
                break
            for key, result in member.lookup(wanted).items():
                found.setdefault(key, replace(result, gateway=member.name))
        return found

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        raise NotImplementedError("ask the provider that took the message, not the list")

    def close(self) -> None:
        """Nothing of its own: the adapters belong to the runtime, which shares them between lists."""
        return None


def _own(error: SendError) -> SendError:
    """A copy of ``error`` whose provider and refusals can be set for one message alone."""
    copy = error.__class__.__new__(error.__class__)
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    copy.__cause__ = error.__cause__
    return copy


def _skipped(name: str, breaker: CircuitBreaker) -> dict[str, Any]:
    return {
        "gateway": name,
        "error_code": CIRCUIT_OPEN,
        "error_message": f"passed over: its circuit is open (probed again within {breaker.retry_in():.0f} s)",
        "trace": [],
    }
