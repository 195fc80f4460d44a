"""Dramatiq brokers: the embedded in-memory default, or Redis or RabbitMQ when ``DISPATCH_BROKER_URL`` is set.

The embedded broker lets ``make demo`` and a laptop run a whole campaign in one
process with no services. With Redis (``redis://``) or RabbitMQ (``amqp://``),
``dispatch run`` only enqueues and ``dispatch worker`` processes send. Either way a
message carries ``(run_id, batch_no)``: the database says which recipients that means.

Both networked brokers keep a lane's delayed messages (retries, batches deferred to the
send window) in a ``<lane>.DQ`` queue that workers hold until due, and give a dead worker's
unacknowledged messages back. What else used to come from Redis (the rate limiter's
schedule, the scheduler's lease) does not come from a RabbitMQ broker: see
``Settings.coordination_redis_url``. Errors reaching either broker become ``BrokerError``
here, with the URL's password masked.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.stub import StubBroker

from .errors import BrokerError
from .redact import mask_url
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
    url = settings.broker_url
    if settings.broker_kind == "rabbitmq":
        return _rabbitmq_broker(url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(
            f"DISPATCH_BROKER_URL: expected a redis:// or amqp:// URL, got {url.split(':')[0]}://"
        )
    import redis
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url, namespace=settings.broker_namespace)
    try:
        broker.client.ping()
    except redis.RedisError as exc:
        raise BrokerError(f"cannot reach the Redis broker at {mask_url(url)}: {exc}") from exc
    return broker


def _rabbitmq_broker(url: str) -> dramatiq.Broker:
    """Dramatiq's RabbitMQ broker, its connection opened once here so a wrong URL fails at start.

    ``confirm_delivery``: RabbitMQ confirms each publish, and a message its queue no longer takes
    (deleted, or a server that lost its data) is refused rather than dropped, so Dramatiq declares
    the queue again and republishes. A batch is one message per recipients chunk, so the wait costs
    little against a lost batch.
    """
    try:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
    except ImportError as exc:  # pragma: no cover - pika is a dependency
        raise BrokerError("the RabbitMQ broker needs pika: pip install 'dramatiq[rabbitmq]'") from exc
    import pika.exceptions

    try:
        broker = RabbitmqBroker(url=url, confirm_delivery=True)
    except ValueError as exc:
        raise BrokerError(f"DISPATCH_BROKER_URL: not a usable amqp:// URL ({mask_url(url)}): {exc}") from exc
    try:
        broker.connection  # noqa: B018 - opens (and keeps) this thread's connection
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"cannot reach the RabbitMQ broker at {mask_url(url)}: {amqp_reason(exc)}") from exc
    return broker


def amqp_reason(exc: BaseException) -> str:
    """pika's exceptions often have an empty ``str`` (a refused socket sits in ``args``): one short reason."""
    text = str(exc) or "; ".join(str(a) for a in exc.args if str(a)) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def _is_rabbitmq(broker: dramatiq.Broker) -> bool:
    return type(broker).__name__ == "RabbitmqBroker"


def ping(broker: dramatiq.Broker) -> None:
    """Raise ``BrokerError`` when the broker cannot be reached (the embedded one always can)."""
    if _is_rabbitmq(broker):
        import pika

        params = broker.parameters  # type: ignore[attr-defined]  # RabbitmqBroker
        try:
            # a connection of its own: this thread's may be idle for long and closed by the server
            pika.BlockingConnection(params).close()
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot reach the RabbitMQ broker: {amqp_reason(exc)}") from exc
        return
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
    in-memory queues and no other process could read them, so it reports none. RabbitMQ: see
    ``_rabbitmq_depths``.
    """
    if _is_rabbitmq(broker):
        return _rabbitmq_depths(broker)
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


def _rabbitmq_depths(broker: dramatiq.Broker) -> dict[str, dict[str, int]]:
    """RabbitMQ's counts per lane: ``ready`` in ``lane``, ``delayed`` in ``lane.DQ``.

    AMQP tells a queue's ready messages (``queue.declare``'s ``message_count``) but not those a
    consumer holds unacknowledged: ``in_progress`` is not reported rather than reported as 0, and
    ``delayed`` counts the delayed messages no worker has fetched yet (a worker fetches delayed
    messages early and holds them until due). The management plugin would tell more, but is an
    HTTP service of its own that a deployment may not run.
    """
    import pika.exceptions

    depths: dict[str, dict[str, int]] = {}
    try:
        for lane in LANES:
            ready, delayed, _dead = broker.get_queue_message_counts(lane)  # type: ignore[attr-defined]
            depths[lane] = {"ready": int(ready), "delayed": int(delayed)}
    except pika.exceptions.AMQPError as exc:
        del broker.connection  # type: ignore[attr-defined]  # the next scrape opens a fresh one
        raise BrokerError(f"cannot read the broker's queues: {amqp_reason(exc)}") from exc
    return depths


# ------------------------------------------------------------------ the watchdog's sentinel


def sentinel_present(broker: dramatiq.Broker, namespace: str, value: str) -> bool:
    """Is the sentinel ``value`` still in the broker? (False: the broker lost its data since it was planted.)

    Redis: a key holding the value. RabbitMQ: a durable queue named after the value, which a restart
    keeps and a server that lost its data does not; nothing consumes it.
    """
    if _is_rabbitmq(broker):
        import pika.exceptions

        try:
            broker.channel.queue_declare(queue=f"{namespace}.sentinel.{value}", passive=True)  # type: ignore[attr-defined]
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            del broker.channel  # type: ignore[attr-defined]  # RabbitMQ closes a channel that asked for a missing queue
            if exc.reply_code == 404:
                return False
            raise BrokerError(f"cannot read the broker's sentinel: {amqp_reason(exc)}") from exc
        except pika.exceptions.AMQPError as exc:
            del broker.connection  # type: ignore[attr-defined]
            raise BrokerError(f"cannot read the broker's sentinel: {amqp_reason(exc)}") from exc
    import redis

    try:
        present = broker.client.get(f"{namespace}:watchdog:sentinel")  # type: ignore[attr-defined]
    except redis.RedisError as exc:
        raise BrokerError(f"cannot read the broker's sentinel: {exc}") from exc
    return present is not None and present.decode() == value


def plant_sentinel(broker: dramatiq.Broker, namespace: str, value: str) -> None:
    """Put sentinel ``value`` in the broker (see ``sentinel_present``)."""
    if _is_rabbitmq(broker):
        import pika.exceptions

        try:
            broker.channel.queue_declare(queue=f"{namespace}.sentinel.{value}", durable=True)  # type: ignore[attr-defined]
        except pika.exceptions.AMQPError as exc:
            del broker.connection  # type: ignore[attr-defined]
            raise BrokerError(f"cannot plant the broker's sentinel: {amqp_reason(exc)}") from exc
        return
    import redis

    try:
        broker.client.set(f"{namespace}:watchdog:sentinel", value)  # type: ignore[attr-defined]
    except redis.RedisError as exc:
        raise BrokerError(f"cannot plant the broker's sentinel: {exc}") from exc
