"""Progress that cannot stall: the scheduler's leader looks after every running run.

Dramatiq messages only carry work; when they are lost (a broker restarted empty, a
retry message that was never sent, a worker that died holding claims) the database
still says what is left. Every ``watchdog_every`` seconds the leader:

- reconciles rows in ``sending`` whose worker is gone, or whose claim has not been
  renewed for ``sending_deadline`` (asks the gateway; fenced on the claim token and on
  ``claimed_at``, so a worker that renews meanwhile keeps its rows);
- re-enqueues the pending batches of a run whose due rows have not moved for
  ``stall_after`` seconds (a duplicate message is harmless: claims are atomic);
- notices a broker that lost its data (a sentinel it planted, a Redis key or a durable
  RabbitMQ queue, is gone while the database remembers planting it) and re-enqueues every running run at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from .errors import DispatchError
from .runs import enqueue_batches, reconcile_orphans

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.watchdog")
SENTINEL = "broker-sentinel"


class Watchdog:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._due_at = 0.0
        #: monotonic time each run was last re-enqueued (at most once per stall_after)
        self._kicked: dict[str, float] = {}

    def tick(self, *, force: bool = False, leading: Callable[[], bool] | None = None) -> dict[str, Any]:
        """One pass if due (or ``force``); returns what it did, per run.

        ``leading`` renews and checks the scheduler's lease: asked before each run and during long
        reconciliations, so a pass that outlives the lease stops rather than act beside the next leader.
        """
        now = time.monotonic()
        if not force and now < self._due_at:
            return {}
        self._due_at = now + self.runtime.settings.watchdog_every
        done: dict[str, Any] = {}
        try:
            lost = self.broker_lost()
            for run_id in self.runtime.store.control.running_runs():
                if leading is not None and not leading():
                    log.warning("watchdog.lead_lost", detail="another scheduler leads now; this pass stops")
                    break
                done[run_id] = self.check_run(run_id, requeue_all=lost, leading=leading)
        except DispatchError as exc:
            log.error("watchdog.failed", error=str(exc))
        return done

    def broker_lost(self) -> bool:
        """True when the broker no longer has the sentinel the database says it was given."""
        settings = self.runtime.settings
        if settings.embedded:
            return False
        from .broker import plant_sentinel, sentinel_present
        from .errors import BrokerError

        store = self.runtime.store
        broker, ns = self.runtime.broker, settings.broker_namespace
        try:
            expected = store.coordination.get_marker(SENTINEL)
            lost = expected is not None and not sentinel_present(broker, ns, expected)
            if expected is None or lost:
                value = uuid.uuid4().hex
                plant_sentinel(broker, ns, value)
                store.coordination.set_marker(SENTINEL, value)
        except BrokerError as exc:
            log.warning("watchdog.broker_unreachable", error=str(exc))
            return False
        if lost:
            log.error("watchdog.broker_lost", detail="the broker lost its queues; re-enqueueing every running run")
        return lost

    def check_run(
        self, run_id: str, *, requeue_all: bool = False, leading: Callable[[], bool] | None = None
    ) -> dict[str, int]:
        runtime, store, settings = self.runtime, self.runtime.store, self.runtime.settings
        result = {"found": 0, "requeued": 0, "batches": 0}
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            deadline = runtime.clock().timestamp() - settings.sending_deadline
            from datetime import UTC, datetime

            orphans = store.orphans(
                run_id, settings.worker_stale_after, older_than=datetime.fromtimestamp(deadline, UTC)
            )
            if orphans:
                result["found"], result["requeued"] = reconcile_orphans(
                    runtime, run_id, orphans, actor="watchdog", leading=leading
                )
                if leading is not None and not leading():
                    return result
            progress = store.control.progress(run_id)
            last = progress.last_progress
            quiet = last is None or (runtime.clock() - last).total_seconds() > settings.stall_after
            kicked = self._kicked.get(run_id, 0.0)
            recently = time.monotonic() - kicked < settings.stall_after
            if requeue_all or result["requeued"] or (progress.due and quiet and not recently):
                batches = store.pending_batches(run_id)
                result["batches"] = enqueue_batches(runtime, run_id, batches)
                self._kicked[run_id] = time.monotonic()
                log.warning(
                    "watchdog.requeued",
                    batches=result["batches"],
                    due=progress.due,
                    last_progress=last.isoformat() if last else None,
                    broker_lost=requeue_all,
                )
            store.finish_if_done(run_id)
        return result
