"""Dramatiq actors: thin wrappers that hand a message's arguments to plain functions.

Actors are declared on an explicit broker (no global broker), so the embedded and
Redis set-ups, and tests with several brokers, never step on each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dramatiq
import structlog

from .broker import BULK_QUEUE, RETRY_QUEUE, URGENT_QUEUE
from .errors import StoreError
from .sender import process_batch

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.actors")


def declared(runtime: Runtime) -> dict[str, Any]:
    """The actors of this process's broker by name, declared on first use."""
    broker = runtime.broker
    with runtime._lock:
        if runtime._actors is None:
            runtime._actors = declare(broker, runtime)
        return runtime._actors


def declare(broker: dramatiq.Broker, runtime: Runtime) -> dict[str, Any]:
    retry: dict[str, Any] = {}

    def lane(
        actor_name: str, queue_name: str, priority: int, min_backoff: int, max_backoff: int, retry_via: str = ""
    ) -> Any:
        def send(run_id: str, batch_no: int) -> None:
            try:
                result = process_batch(runtime, run_id, batch_no)
            except StoreError as exc:
                # the delivery log is unreachable: one structured line, and the message comes back later
                # (never acked before its results are recorded); an in-process run stops and says so
                log.warning("batch.store_unavailable", run_id=run_id, batch=batch_no, error=str(exc))
                if runtime.settings.embedded and runtime.fatal is None:
                    runtime.fatal = f"the delivery log cannot be written or read: {exc}"
                raise dramatiq.Retry(str(exc)) from exc
            if result.retry_in is not None:
                # rows of this batch were postponed (rate limited, busy, window closed): come back when
                # they are due. Enqueued before this message is acked, so a crash here can only duplicate
                # the message, which the claim makes harmless.
                target = retry.get(retry_via, actor)
                target.send_with_options(args=(run_id, batch_no), delay=int(result.retry_in * 1000) + 50)

        send.__name__ = actor_name
        actor = dramatiq.actor(
            broker=broker,
            actor_name=actor_name,
            queue_name=queue_name,
            priority=priority,
            max_retries=10,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            time_limit=15 * 60 * 1000,
        )(send)
        return actor

    # due retries of bulk batches: their own queue and a priority above fresh bulk batches, so the
    # backoff (1, 2, 4, 8 s) is kept rather than waiting for the queue to get round to them
    retry["bulk"] = lane("send_retry_batch", RETRY_QUEUE, 5, 1000, 60_000, retry_via="bulk")
    return {
        "send_batch": lane("send_batch", BULK_QUEUE, 10, 1000, 60_000, retry_via="bulk"),
        "send_retry_batch": retry["bulk"],
        # its own queue, and a higher priority (lower number) so that a worker consuming both lanes
        # takes urgent messages ahead of bulk ones it has already prefetched
        "send_urgent_batch": lane("send_urgent_batch", URGENT_QUEUE, 0, 500, 30_000),
    }
