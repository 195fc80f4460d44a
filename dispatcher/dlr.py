"""Delivery reports chased to the end: rows ``sent`` whose final report never came.

A carrier that drops a message silently sends no report, and without this sweep the
row would stay ``sent`` for ever, counted as reached. So, for rows handed over more
than ``dlr_chase_after`` seconds ago and still ``sent``:

- a gateway that declares ``can_fetch_status`` is asked for each message's status by
  its provider id; what it says is recorded by the store's ``apply_statuses``, which
  applies each answer exactly as ``apply_status`` applies a status callback (forward
  only, an attempt row and a ledger event per change), a page of answers per transaction;
- rows still ``sent`` more than ``dlr_deadline`` seconds after the hand-over become
  ``unconfirmed`` with the reason, in the transaction that writes their ledger event
  (only after the provider was asked about every row due: not while it cannot be
  reached, since it may still know). A report that arrives later still moves them
  to delivered or undelivered.

The scheduler's leader runs ``DeliveryReportSweep.tick`` beside the watchdog (every
``dlr_every`` seconds, asking about each row at most once per ``dlr_chase_after`` and
about at most ``MAX_FETCH_PER_TICK`` rows per pass, so a large silent run cannot hold
up the schedule); ``dispatch reconcile RUN`` runs ``chase_run`` once over one run,
asking about every row due.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from .errors import DispatchError, SendError
from .store import DELIVERED, FAILED, SENT, UNCONFIRMED, UNDELIVERED

if TYPE_CHECKING:
    from .providers.base import Gateway
    from .runtime import Runtime
    from .store import SqlStore

log = structlog.get_logger("dispatcher.dlr")

#: provider ids per ``fetch_status`` call (and per page read from the delivery log)
CHUNK = 100
#: rows the leader asks about per pass at most; the rest wait for the next pass
MAX_FETCH_PER_TICK = 200


@dataclass
class ChaseResult:
    """What one sweep over one run did, and where the run's reports stand afterwards."""

    run_id: str
    gateway: str
    #: False: the gateway cannot be asked, so rows only wait for their deadline
    can_fetch_status: bool
    asked: int = 0
    answered: int = 0
    delivered: int = 0
    undelivered: int = 0
    failed: int = 0
    #: rows the provider knows but has no final status for yet
    no_final_status: int = 0
    unconfirmed: int = 0
    #: why asking stopped early (the provider could not be reached), if it did
    error: str | None = None
    #: the run's rows by delivery state after the sweep (sent, delivered, undelivered, unconfirmed)
    now: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def human_seconds(seconds: float) -> str:
    """``72h``, ``30m``, ``90s``, ``14d``: how the settings are usually written (days from a week up)."""
    s = int(seconds)
    for unit, size, least in (("d", 86400, 7 * 86400), ("h", 3600, 3600), ("m", 60, 60)):
        if s >= least and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def deadline_reason(deadline: float) -> str:
    return f"no final delivery report within {human_seconds(deadline)} of the hand-over"


def chase_run(
    runtime: Runtime,
    run_id: str,
    *,
    actor: str = "reconcile",
    memory: AskedMemory | None = None,
    budget: int | None = None,
) -> ChaseResult:
    """Ask the provider about the run's rows still ``sent`` after ``dlr_chase_after``; mark the
    ones past ``dlr_deadline`` ``unconfirmed``.

    ``memory`` leaves out rows asked about recently (and remembers the ones asked now); ``budget``
    caps how many are asked. Each row is asked of the provider that took it (its ids mean
    nothing to another), rows of a provider this process cannot ask are not; the deadline applies
    to every row, but only once every row due has been asked (not while the provider is
    unreachable, nor when the budget ran out first): a row is given up as unconfirmed only after
    the provider had its chance to say.
    """
    store, settings = runtime.store, runtime.settings
    now = runtime.clock()
    chase_before = now - timedelta(seconds=settings.dlr_chase_after)
    deadline_before = now - timedelta(seconds=settings.dlr_deadline)
    askable = askable_providers(runtime)
    result = ChaseResult(run_id, runtime.gateway.name, bool(askable))
    with structlog.contextvars.bound_contextvars(run_id=run_id):
        complete = not askable
        if askable:
            after = 0
            while budget is None or result.asked < budget:
                page = store.provider_events.awaiting_report(run_id, chase_before, after_id=after, limit=CHUNK)
                if not page:
                    complete = True
                    break
                after = page[-1].id
                # each row is asked of the provider that took it (a failover list or a campaign's own
                # `gateways:` spreads one run over several); rows of a provider that cannot be asked wait
                due = [r for r in page if r.gateway in askable and not (memory and memory.recent(r.id))]
                if budget is not None:
                    due = due[: budget - result.asked]
                if not due:
                    continue
                if memory is not None:
                    memory.mark(r.id for r in due)
                by_provider: dict[str, list[str]] = {}
                for r in due:
                    by_provider.setdefault(r.gateway or "", []).append(r.provider_id)
                for name, provider_ids in by_provider.items():
                    if not _chase_page(store, askable[name], provider_ids, result):
                        break
                if result.error is not None:
                    break
        if complete and result.error is None:
            result.unconfirmed = store.provider_events.mark_unconfirmed(
                run_id, deadline_before, reason=deadline_reason(settings.dlr_deadline), actor=actor
            )
        counts = store.counts(run_id)
        result.now = {s: counts.get(s, 0) for s in (SENT, DELIVERED, UNDELIVERED, UNCONFIRMED)}
        if result.asked or result.unconfirmed:
            log.info("dlr.chased", **{k: v for k, v in result.as_dict().items() if k not in ("run_id", "now")})
    return result


def askable_providers(runtime: Runtime) -> dict[str, Gateway]:
    """The SMS providers this process can ask about a message's status, by name.

    A provider this process is not configured for (no credentials, no config file) cannot be
    asked, and neither can one that declares no ``can_fetch_status``.
    """
    found: dict[str, Gateway] = {}
    for name in runtime.known_gateways():
        try:
            adapter = runtime.gateway_for([name])
        except DispatchError:
            continue
        if adapter.can_fetch_status:
            found[name] = adapter
    return found


def _chase_page(store: SqlStore, gateway: Gateway, provider_ids: list[str], result: ChaseResult) -> bool:
    """Ask one provider about some of its messages and record the answers; False if it could not be asked."""
    try:
        answers = gateway.fetch_status(provider_ids)
    except SendError as exc:
        result.error = f"{exc.code}: {exc}"
        log.warning("dlr.fetch_failed", gateway=gateway.name, error=result.error)
        return False
    finally:
        result.asked += len(provider_ids)
    result.answered += len(answers)
    changes = store.provider_events.apply_statuses(
        [(pid, st.status, st.error_code) for pid, st in answers.items()], actor=f"dlr:{gateway.name}"
    )
    moved_to: dict[str, set[str]] = {}
    for change in changes:
        moved_to.setdefault(change.provider_id or "", set()).add(change.to_state)
    for provider_id in answers:
        moved = moved_to.get(provider_id, set())
        if DELIVERED in moved:
            result.delivered += 1
        elif UNDELIVERED in moved:
            result.undelivered += 1
        elif FAILED in moved:
            result.failed += 1
        else:
            result.no_final_status += 1
    return True


class AskedMemory:
    """When each delivery row was last asked about (monotonic), so a silent row is asked at most once
    per ``every`` seconds. It is one leader's memory: a new leader asks once more, which is harmless."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._at: dict[int, float] = {}

    def recent(self, delivery_id: int) -> bool:
        return time.monotonic() - self._at.get(delivery_id, float("-inf")) < self.every

    def mark(self, delivery_ids: Iterable[int]) -> None:
        now = time.monotonic()
        for delivery_id in delivery_ids:
            self._at[delivery_id] = now

    def forget_old(self) -> None:
        cutoff = time.monotonic() - self.every
        self._at = {k: v for k, v in self._at.items() if v > cutoff}


class DeliveryReportSweep:
    """The leader's sweep over every run with rows awaiting a final report."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._due_at = 0.0
        self.memory = AskedMemory(runtime.settings.dlr_chase_after)

    def tick(self, *, force: bool = False) -> dict[str, ChaseResult]:
        """One pass if due (or ``force``): returns what it did, per run."""
        settings = self.runtime.settings
        mono = time.monotonic()
        if not force and mono < self._due_at:
            return {}
        self._due_at = mono + settings.dlr_every
        self.memory.forget_old()
        done: dict[str, ChaseResult] = {}
        budget = MAX_FETCH_PER_TICK
        chase_before = self.runtime.clock() - timedelta(seconds=settings.dlr_chase_after)
        try:
            for run_id in self.runtime.store.provider_events.runs_awaiting_reports(chase_before):
                result = chase_run(self.runtime, run_id, actor="scheduler", memory=self.memory, budget=budget)
                budget = max(0, budget - result.asked)
                done[run_id] = result
        except DispatchError as exc:
            log.error("dlr.sweep_failed", error=str(exc))
        return done
