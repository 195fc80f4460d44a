"""What a provider is: the protocols its adapters implement and the port its webhooks write through.

A provider (one package under ``providers/``) declares everything it can do here,
in ``Provider``: the channels it serves, its SMS adapter, its ringback adapter, its
webhook routes. Nothing is probed with ``getattr``: an adapter that cannot look a
message up says ``can_lookup = False``; one that takes many numbers per call says
how many in ``batch_capacity``.

A gateway hands one message to a provider (``send``) or many at once
(``send_many``, for providers that take a batch in one call), and answers which
idempotency keys it has already accepted (``lookup``), so that rows left in
``sending`` or ``unknown`` by a crash or an ambiguous reply are reconciled instead
of resent. One that can be asked what became of a message after the hand-over
says ``can_fetch_status = True`` and answers ``fetch_status`` by provider id: the
delivery-report sweep (``dlr.py``) asks it about rows whose report never came.
Adapters raise only ``SendError`` subclasses (``errors.py``); the third-party
exception is chained with ``raise ... from exc``.

A network provider answers each request after tens or hundreds of milliseconds, and
takes many at once (Twilio allows about a hundred concurrent API requests per
account): one request at a time per worker thread caps a worker at a few dozen
messages a second whatever the provider's rate. A gateway that says
``concurrency = n`` has its ``send_many`` drive up to ``n`` requests at once over
its pooled client (``Handover`` on threads, ``AsyncHandover`` on an event loop), one pool per gateway
object, so per worker process; the answers still come back per message, in order.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from ..errors import GatewayDown, SendError, UnavailableSendError

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from ..settings import Settings

#: what a provider can carry: text messages, the ringback tone (彩铃) callers of a number hear, or voice calls
Channel = Literal["sms", "ringback", "voice"]


# Not frozen: one of these is built for every recipient, and a frozen dataclass's ``__init__`` sets each
# field through ``object.__setattr__``, three times the cost of a plain one's (1.6 µs against 0.5 for an
# ``Event``). The per-recipient types (this, ``SendResult``, ``Claimed``, ``ledger.Event``, ``Composed``,
# ``Segmentation``) are plain slotted dataclasses that nothing mutates or hashes.
@dataclass(slots=True)
class OutgoingMessage:
    key: str  # idempotency key: run + phone
    run_id: str
    campaign_id: str
    to: str  # E.164
    body: str
    parts: int
    encoding: str
    #: do not deliver after this moment (provider-side validity where supported)
    send_by: datetime | None = None
    priority: str = "bulk"
    #: the delivery row this message is for: a voice call's TwiML and key-press URLs name it (never the number)
    delivery_id: int | None = None


@dataclass(slots=True)  # per recipient: not frozen (see OutgoingMessage)
class SendResult:
    provider_id: str
    #: the provider's own status at hand-over (queued, accepted, ...)
    status: str = "sent"
    #: redacted HTTP exchanges of this send (method, url, status, elapsed_ms, bodies)
    trace: list[dict[str, Any]] = field(default_factory=list)
    #: the provider that took it, when a failover gateway chose among several (None: the only one)
    gateway: str | None = None
    #: providers tried first that proved they took nothing (gateway, error_code, error_message, trace)
    refusals: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class LookupRequest:
    """Did this message reach the provider? ``since`` is when the uncertain attempt started."""

    key: str
    to: str
    body: str
    since: datetime | None


@dataclass(frozen=True)
class MessageStatus:
    """What a provider says about a message it took: its own status word and error code, if any."""

    #: the provider's word (queued, sent, delivered, undelivered, failed, ...): ``apply_status`` maps it
    status: str
    error_code: str | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class Gateway(Protocol):
    name: str
    #: whether ``lookup`` can tell if the provider took a message; False: ``unknown`` rows wait for an operator
    can_lookup: bool
    #: numbers one call can carry; the sender hands over chunks at least this large so batches stay whole
    batch_capacity: int
    #: whether ``fetch_status`` can say what became of a message after the hand-over
    can_fetch_status: bool
    #: requests ``send_many`` keeps in flight at once; the sender hands over chunks at least this large
    concurrency: int

    def send(self, message: OutgoingMessage) -> SendResult:
        """Hand one message over; raise a ``SendError`` subclass on failure."""
        ...

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """Hand several over; one result or error per message, in order."""
        ...

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        """The subset of ``requests`` (by key) that the provider has accepted."""
        ...

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        """The provider's current status of each message it knows, by provider id (unknown ids left out).

        Raise a ``SendError`` subclass when the provider cannot be asked now (the sweep tries again).
        """
        ...

    def close(self) -> None: ...


T = TypeVar("T")
R = TypeVar("R")


class _NotHandedOver:
    """A message a concurrent ``send_many`` never started, because the gateway had gone down."""


_NOT_HANDED_OVER = _NotHandedOver()


class Handover:
    """Up to ``concurrency`` sends of one gateway in flight at once, on threads of its own.

    For adapters that are blocking code over one ``httpx.Client`` (the HTTP carrier adapter, ringback),
    which is thread-safe and pools keep-alive connections (sized to ``concurrency`` by the adapter); an
    adapter with an async client uses ``AsyncHandover`` instead, which costs far less CPU per request
    in flight (the Twilio adapter, through the library's async API). One pool serves every worker
    thread of the process, so ``concurrency`` bounds the whole process's requests to the provider.
    Each send runs in a copy of the caller's context: its log fields and its own trace
    (``httptrace.collecting``) are those of the batch that handed it over.
    """

    def __init__(self, concurrency: int, name: str) -> None:
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._name = name

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"{self._name}-send")
            return self._pool

    def run(self, send: Callable[[T], R], items: Sequence[T]) -> list[R | SendError]:
        """``send`` per item (a message, or a carrier call of several), answers in order, ``concurrency``
        in flight at once, with the guarantees of a loop:

        - every item gets its own answer, in order: what ``send`` returned or the ``SendError`` it raised;
        - when a send raises ``GatewayDown``, no item not yet started is started; the ones in flight
          finish (none is abandoned half-sent), and ``GatewayDown.done`` holds the answers of every
          item up to the last one whose request completed, an item in between that was never handed
          over answered ``UnavailableSendError`` (``gateway.down``: nothing sent, retried); the items
          after it were not handed over and go back;
        - anything else a send raises is raised once every request in flight has finished.
        """
        if self.concurrency <= 1 or len(items) <= 1:
            return _one_by_one(send, items)
        down = threading.Event()

        def one(item: T) -> R | BaseException | _NotHandedOver:
            if down.is_set():
                return _NOT_HANDED_OVER
            try:
                return send(item)
            except GatewayDown as exc:
                down.set()
                return exc
            except Exception as exc:  # SendError, or a bug raised once the others are in
                return exc

        pool = self._executor()
        futures = [pool.submit(contextvars.copy_context().run, one, item) for item in items]
        return _settle([f.result() for f in futures])

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _settle(answers: Sequence[Any]) -> list[Any]:
    """The answers of a concurrent hand-over as a loop would have given them (see ``Handover.run``)."""
    stopped = next((a for a in answers if isinstance(a, GatewayDown)), None)
    if stopped is not None:
        handed = [not isinstance(a, GatewayDown | _NotHandedOver) for a in answers]
        last = max((i for i, h in enumerate(handed) if h), default=-1)
        done = [
            a if handed[i] else UnavailableSendError(f"not handed over: {stopped}", code="gateway.down")
            for i, a in enumerate(answers[: last + 1])
        ]
        raise GatewayDown(str(stopped), done=done) from stopped
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, SendError):
            raise answer
    return list(answers)


class AsyncHandover:
    """``Handover`` on one event loop: up to ``concurrency`` coroutine sends in flight, no thread each.

    Fifty threads blocked on a provider's 150 ms answers spend more CPU taking turns at the GIL and at
    httpx's pool lock than on the requests (measured: 2.5 ms of CPU a message against 0.34 ms for the
    ``twilio`` library's own async client), so an adapter with an async client runs its batch here:
    one loop thread per gateway object, started on first use. The caller's context is copied into the
    batch's task, and asyncio gives each send a copy of that, so log fields and per-send traces behave
    as in ``Handover``; the answers are settled the same way (in order, ``GatewayDown`` with ``done``).
    """

    def __init__(self, concurrency: int, name: str) -> None:
        self.concurrency = max(1, concurrency)
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"{self._name}-loop", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def call(self, coroutine: Coroutine[Any, Any, R]) -> R:
        """Run one coroutine on the loop, in a copy of the caller's context, and wait for its answer."""
        loop = self.loop()
        context = contextvars.copy_context()
        done: Future[R] = Future()

        def start() -> None:
            task = loop.create_task(coroutine, context=context)

            def finished(t: asyncio.Task[R]) -> None:
                if t.cancelled():
                    done.set_exception(RuntimeError("the send loop was stopped"))
                elif (exc := t.exception()) is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(t.result())

            task.add_done_callback(finished)

        loop.call_soon_threadsafe(start)
        return done.result()

    def run(self, send: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R | SendError]:
        """``send`` per item, ``concurrency`` at once, with ``Handover.run``'s guarantees."""

        async def everything() -> list[Any]:
            gate = asyncio.Semaphore(self.concurrency)
            down = False

            async def one(item: T) -> Any:
                nonlocal down
                async with gate:
                    if down:
                        return _NOT_HANDED_OVER
                    try:
                        return await send(item)
                    except GatewayDown as exc:
                        down = True
                        return exc
                    except Exception as exc:  # SendError, or a bug raised once the others are in
                        return exc

            return list(await asyncio.gather(*(one(item) for item in items)))

        return _settle(self.call(everything()))

    def close(self, closing: Coroutine[Any, Any, Any] | None = None) -> None:
        """Stop the loop, after running ``closing`` on it (the async client's ``aclose``)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            if closing is not None:
                closing.close()
            return
        if closing is not None:
            asyncio.run_coroutine_threadsafe(closing, loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        loop.close()


def _one_by_one(send: Callable[[T], R], items: Sequence[T]) -> list[R | SendError]:
    """One ``send`` each; when the provider goes away mid-chunk, what it took before is handed up with
    the stop (``GatewayDown.done``), so those messages are recorded and only the rest go back."""
    results: list[R | SendError] = []
    for message in items:
        try:
            results.append(send(message))
        except SendError as exc:
            results.append(exc)
        except GatewayDown as exc:
            raise GatewayDown(str(exc), done=results) from exc
    return results


class BaseGateway:
    """Shared behaviour: ``send_many`` as ``send`` per message, ``concurrency`` of them at once
    (``Handover``; one at a time unless the adapter sets ``handover``)."""

    name = "base"
    can_lookup = True
    batch_capacity = 1
    can_fetch_status = False
    #: requests in flight at once; an adapter that drives several calls ``drive_concurrently``
    concurrency = 1
    handover: Handover | None = None

    def drive_concurrently(self, concurrency: int) -> None:
        """Let ``send_many`` keep up to ``concurrency`` requests in flight (1: one at a time)."""
        self.concurrency = max(1, concurrency)
        self.handover = Handover(self.concurrency, self.name) if self.concurrency > 1 else None

    def send(self, message: OutgoingMessage) -> SendResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """One ``send`` per message (``Handover.run``): answers in order; on ``GatewayDown`` the answers
        of what was handed over before travel with the stop (``GatewayDown.done``)."""
        if self.handover is None:
            return _one_by_one(self.send, messages)
        return self.handover.run(self.send, messages)

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:  # pragma: no cover
        raise NotImplementedError

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:  # pragma: no cover
        raise NotImplementedError(f"{self.name} cannot be asked for a message's status")

    def close(self) -> None:
        if self.handover is not None:
            self.handover.close()


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
    """Enrol a number with the warning tone for a window, restore it after; both idempotent."""

    name: str
    #: numbers enrolled (or restored) at once; 1: one request at a time
    concurrency: int

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        """Make callers of ``request.phone`` hear the warning; raise a ``SendError`` on failure."""
        ...

    def restore(self, request: RingbackRequest) -> RingbackResult:
        """Undo the enrolment with ``request.kept``; restoring what is already restored is fine."""
        ...

    def close(self) -> None: ...


class VoiceGateway(Gateway, Protocol):
    """Places one call per message: ``body`` is what is said, ``delivery_id`` names the row in our URLs.

    The same contract as an SMS gateway (``send``/``send_many``/``lookup``), so a voice run gets
    every guarantee of the batch skeleton: a call the provider accepted is ``sent`` with the
    call's id; ``answered`` -> ``delivered``; busy, no answer, failed, canceled -> ``failed``
    (``CALL_STATUSES``).
    """


#: what a call asks after each saying of the warning: the listener confirms they heard it with 1
CONFIRM_PROMPT = "如您已听清以上提醒，请按1确认。"

#: a provider's call status -> (the delivery-report word ``apply_status`` understands, our error code).
#: Answered and completed calls were heard; the rest never were. Unknown words are ignored.
CALL_STATUSES: dict[str, tuple[str, str | None]] = {
    "queued": ("sent", None),
    "initiated": ("sent", None),
    "ringing": ("sent", None),
    "answered": ("delivered", None),
    "in-progress": ("delivered", None),
    "completed": ("delivered", None),
    "busy": ("failed", "voice.busy"),
    "no-answer": ("failed", "voice.no_answer"),
    "failed": ("failed", "voice.failed"),
    "canceled": ("failed", "voice.canceled"),
}


class DeliveryReports(Protocol):
    """The port through which a provider's webhooks change delivery state.

    Providers never import the store: the web app adapts the store to this port
    (``web/delivery_reports.py``) and hands it to each provider's routes. Calls are
    blocking; handlers run them in a thread.
    """

    def apply_status(self, provider_id: str, status: str, *, error_code: str | None, actor: str) -> int:
        """Move the rows holding ``provider_id`` forward to ``status``; returns how many changed.

        ``actor`` names the reporting provider: a report authenticated by one provider's
        secret must only move rows that provider sent.
        """
        ...

    def set_opted_out(self, phone: str, opted_out: bool) -> bool:
        """Record an opt-out (or opt back in); False when the number is not in the registry."""
        ...

    def ringback_text(self, campaign_id: str) -> str | None:
        """The warning the newest ringback run of the campaign says; None when there is none to say."""
        ...

    def voice_script(self, delivery_id: int) -> str | None:
        """What the call of voice delivery ``delivery_id`` says; None when there is no such call."""
        ...

    def key_press(self, delivery_id: int | None, digits: str, *, call_sid: str | None, actor: str) -> str:
        """Record a key press on that call (None: the call ``call_sid``, as a carrier's report names it):
        ``confirmed`` (1), ``repeated`` (1 again), ``recorded`` (another key) or ``unknown``."""
        ...


#: builds an SMS adapter from the settings
GatewayFactory = Callable[["Settings"], Gateway]
#: builds a ringback adapter; tests inject the HTTP transport and extra headers
RingbackFactory = Callable[..., RingbackGateway]
#: builds a voice adapter; tests inject the HTTP transport and extra headers
VoiceFactory = Callable[..., VoiceGateway]
#: a provider's webhook routes, given the port they write through and the settings
RoutesFactory = Callable[[DeliveryReports, "Settings"], "list[BaseRoute]"]


@dataclass(frozen=True)
class Provider:
    """Everything one provider package offers, declared once and registered by name.

    ``gateway``/``ringback`` build the adapters lazily (their third-party
    dependencies are imported only when the provider is chosen); ``ringback_name``
    is what ``DISPATCH_RINGBACK_GATEWAY`` calls its ringback adapter.

    ``reports_for`` names the gateways (SMS adapter and ringback adapter names) whose
    rows this provider's delivery reports may move: a report authenticated by one
    provider's secret says nothing about messages another provider carried. None
    leaves the provider's reports unrestricted (a provider whose message ids cannot
    collide with another's).
    """

    name: str
    channels: frozenset[Channel]
    gateway: GatewayFactory | None = None
    ringback_name: str | None = None
    ringback: RingbackFactory | None = None
    routes: RoutesFactory | None = None
    reports_for: tuple[str, ...] | None = None
    #: what ``DISPATCH_VOICE_GATEWAY`` calls this provider's voice adapter
    voice_name: str | None = None
    voice: VoiceFactory | None = None
    #: numbers one call of its SMS adapter carries, read from the settings without building the adapter
    #: (``dispatch preview`` writes and opens nothing); None: one number a call
    batch_capacity: Callable[[Settings], int] | None = None

    def __post_init__(self) -> None:
        if ("sms" in self.channels) != (self.gateway is not None):
            raise ValueError(f"provider {self.name!r}: the sms channel and an SMS adapter go together")
        if ("ringback" in self.channels) != (self.ringback is not None and self.ringback_name is not None):
            raise ValueError(f"provider {self.name!r}: the ringback channel needs a named ringback adapter")
        if ("voice" in self.channels) != (self.voice is not None and self.voice_name is not None):
            raise ValueError(f"provider {self.name!r}: the voice channel needs a named voice adapter")


__all__ = [
    "CALL_STATUSES",
    "CONFIRM_PROMPT",
    "BaseGateway",
    "Channel",
    "DeliveryReports",
    "Gateway",
    "Handover",
    "LookupRequest",
    "MessageStatus",
    "OutgoingMessage",
    "Provider",
    "RingbackGateway",
    "RingbackRequest",
    "RingbackResult",
    "SendResult",
    "VoiceGateway",
]
