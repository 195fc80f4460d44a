"""Dramatiq actors: thin wrappers that hand a message's arguments to plain functions.

Actors are declared on an explicit broker (no global broker), so the embedded and
Redis set-ups, and tests with several brokers, never step on each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dramatiq

from .broker import BULK_QUEUE, URGENT_QUEUE
from .sender import process_batch

if TYPE_CHECKING:
    from .runtime import Runtime


def declare(broker: dramatiq.Broker, runtime: Runtime) -> dict[str, Any]:
    def send_batch(run_id: str, batch_no: int) -> None:
        result = process_batch(runtime, run_id, batch_no)
        if result.retry_in is not None:
            # rows of this batch were postponed (rate limited, busy): come back when they are due.
            # Enqueued before this message is acked, so a crash here can only duplicate the
            # message, which the claim makes harmless.
            actor.send_with_options(args=(run_id, batch_no), delay=int(result.retry_in * 1000) + 50)

    actor = dramatiq.actor(
        broker=broker,
        actor_name="send_batch",
        queue_name=BULK_QUEUE,
        priority=10,
        max_retries=10,
        min_backoff=1000,
        max_backoff=60_000,
        time_limit=15 * 60 * 1000,
    )(send_batch)

    def send_urgent_batch(run_id: str, batch_no: int) -> None:
        result = process_batch(runtime, run_id, batch_no)
        if result.retry_in is not None:
            urgent.send_with_options(args=(run_id, batch_no), delay=int(result.retry_in * 1000) + 50)

    # its own queue, and a higher priority (lower number) so that a worker consuming both lanes
    # takes urgent messages ahead of bulk ones it has already prefetched
    urgent = dramatiq.actor(
        broker=broker,
        actor_name="send_urgent_batch",
        queue_name=URGENT_QUEUE,
        priority=0,
        max_retries=10,
        min_backoff=500,
        max_backoff=30_000,
        time_limit=15 * 60 * 1000,
    )(send_urgent_batch)
    return {"send_batch": actor, "send_urgent_batch": urgent}
