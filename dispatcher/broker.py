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

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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

    from .redis_broker import PromptRedisBroker

    broker = PromptRedisBroker(url=url, namespace=settings.broker_namespace)
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

    # pika logs every failed connection attempt as an ERROR with its traceback, many lines each; the
    # same failure reaches the operator once, as one line: a BrokerError here, Dramatiq's own
    # "consumer encountered a connection error" in a worker
    logging.getLogger("pika").setLevel(logging.CRITICAL)
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
    text = str(exc) or "; ".join(str(a) or repr(a) for a in exc.args) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def _is_rabbitmq(broker: dramatiq.Broker) -> bool:
    return type(broker).__name__ == "RabbitmqBroker"


def ping(broker: dramatiq.Broker) -> None:
    """Raise ``BrokerError`` when the broker cannot be reached (the embedded one always can)."""
    if _is_rabbitmq(broker):
        import pika.exceptions

        try:
            with _amqp_connection(broker):  # this thread's connection may have idled out: a fresh one
                pass
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

    AMQP tells a queue's ready messages (a passive ``queue.declare``'s ``message_count``) but not
    those a consumer holds unacknowledged: ``in_progress`` is not reported rather than reported as
    0, and ``delayed`` counts the delayed messages no worker has fetched yet (a worker fetches
    delayed messages early and holds them until due). The management plugin would tell more, but
    it is an HTTP service of its own that a deployment may not run. A lane never declared holds 0.
    """
    import pika.exceptions
    from dramatiq.common import dq_name

    depths: dict[str, dict[str, int]] = {}
    try:
        with _amqp_connection(broker) as conn:
            for lane in LANES:
                depths[lane] = {"ready": _ready(conn, lane), "delayed": _ready(conn, dq_name(lane))}
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"cannot read the broker's queues: {amqp_reason(exc)}") from exc
    return depths


@contextmanager
def _amqp_connection(broker: dramatiq.Broker) -> Iterator[Any]:
    """A connection of its own for an occasional look (a scrape, a watchdog pass).

    Dramatiq keeps one connection per thread, and pika only answers the server's heartbeats while
    a connection is used: one idle between two scrapes (each maybe on another web thread) is closed
    by the server and would fail the next look. A fresh one costs a few milliseconds.
    """
    import pika

    conn = pika.BlockingConnection(broker.parameters)  # type: ignore[attr-defined]  # RabbitmqBroker
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


def _ready(conn: Any, queue: str) -> int:
    """Ready messages in ``queue``; 0 when it does not exist."""
    found = _passive_declare(conn, queue)
    return 0 if found is None else found


def _passive_declare(conn: Any, queue: str) -> int | None:
    """``queue``'s ready messages, or None when it does not exist (RabbitMQ then closes the channel)."""
    import pika.exceptions

    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    finally:
        if channel.is_open:
            channel.close()


# ------------------------------------------------------------------ the watchdog's sentinel


def sentinel_present(broker: dramatiq.Broker, namespace: str, value: str) -> bool:
    """Is the sentinel ``value`` still in the broker? (False: the broker lost its data since it was planted.)

    Redis: a key holding the value. RabbitMQ: a durable queue named after the value, which a restart
    keeps and a server that lost its data does not; nothing consumes it.
    """
    if _is_rabbitmq(broker):
        import pika.exceptions

        try:
            with _amqp_connection(broker) as conn:
                return _passive_declare(conn, f"{namespace}.sentinel.{value}") is not None
        except pika.exceptions.AMQPError as exc:
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
            with _amqp_connection(broker) as conn:
                conn.channel().queue_declare(queue=f"{namespace}.sentinel.{value}", durable=True)
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot plant the broker's sentinel: {amqp_reason(exc)}") from exc
        return
    import redis

    try:
        broker.client.set(f"{namespace}:watchdog:sentinel", value)  # type: ignore[attr-defined]
    except redis.RedisError as exc:
        raise BrokerError(f"cannot plant the broker's sentinel: {exc}") from exc
