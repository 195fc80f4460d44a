"""Dramatiq brokers: the embedded in-memory default, or Redis when ``DISPATCH_BROKER_URL`` is set.

The embedded broker lets ``make demo`` and a laptop run a whole campaign in one
process with no services. With Redis, ``dispatch run`` only enqueues and
``dispatch worker`` processes send. Either way a message carries
``(run_id, batch_no)``: the database says which recipients that means.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.stub import StubBroker

from .errors import BrokerError
from .settings import Settings

BULK_QUEUE = "bulk"
#: urgent runs (early-warning alerts, campaigns with priority: urgent) have their own lane
URGENT_QUEUE = "urgent"
#: bulk batches coming back for rows whose retry is due: their own queue, so a due retry does not wait
#: behind every fresh batch of a large run (a delayed message re-enters its queue at the back)
RETRY_QUEUE = "bulk-retry"


def make_broker(settings: Settings) -> dramatiq.Broker:
    if settings.embedded:
        broker: dramatiq.Broker = StubBroker()
        broker.emit_after("process_boot")
        return broker
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(
            f"DISPATCH_BROKER_URL: only redis:// URLs are supported, got {settings.broker_url.split(':')[0]}://"
        )
    import redis
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=settings.broker_url, namespace=settings.broker_namespace)
    try:
        broker.client.ping()
    except redis.RedisError as exc:
        raise BrokerError(f"cannot reach the Redis broker: {exc}") from exc
    return broker


def ping(broker: dramatiq.Broker) -> None:
    client = getattr(broker, "client", None)
    if client is None:
        return
    import redis

    try:
        client.ping()
    except redis.RedisError as exc:
        raise BrokerError(f"cannot reach the Redis broker: {exc}") from exc


#: every lane a batch may wait in
LANES = (BULK_QUEUE, RETRY_QUEUE, URGENT_QUEUE)


def queue_depths(broker: dramatiq.Broker) -> dict[str, dict[str, int]]:
    """Messages per lane as the broker holds them: ``ready``, ``delayed``, ``in_progress``.

    Dramatiq's Redis broker keeps a lane's waiting message ids in the list ``ns:lane`` and
    every message it has not acked (waiting or held by a worker) in the hash ``ns:lane.msgs``;
    a delayed message (a retry, a batch deferred to the send window's opening) sits under
    ``ns:lane.DQ`` until its time. Read in one round trip; the embedded broker has its own
    in-memory queues and no other process could read them, so it reports none.
    """
    client = getattr(broker, "client", None)
    if client is None:
        return {}
    import redis

    ns = broker.namespace  # type: ignore[attr-defined]  # RedisBroker
    try:
        with client.pipeline(transaction=False) as pipe:
            for lane in LANES:
                pipe.llen(f"{ns}:{lane}")
                pipe.hlen(f"{ns}:{lane}.msgs")
                pipe.hlen(f"{ns}:{lane}.DQ.msgs")
            counts = pipe.execute()
    except redis.RedisError as exc:
        raise BrokerError(f"cannot read the broker's queues: {exc}") from exc
    depths: dict[str, dict[str, int]] = {}
    for i, lane in enumerate(LANES):
        ready, unacked, delayed = (int(n) for n in counts[3 * i : 3 * i + 3])
        depths[lane] = {"ready": ready, "in_progress": max(0, unacked - ready), "delayed": delayed}
    return depths
