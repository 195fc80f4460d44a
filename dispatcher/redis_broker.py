"""Dramatiq's Redis broker, with a consumer that fetches a worker's next batch as soon as a thread is free.

Dramatiq's Redis consumer fetches only while fewer messages are outstanding than it may prefetch, and
counts every pass that fetched nothing as a miss: it then sleeps, longer with each miss, up to the
worker's idle timeout. A worker prefetches one batch per thread (``workers._worker``), so while every
thread is busy each pass "misses" and the sleeps grow to the timeout (100 ms): a thread that finished a
batch waited for the consumer's sleep to end before it got the next. With 4 threads and messages that
take 100 ms each, 120 of them took 3.72–3.81 s where 3.00 s is the least (24–27 ms lost per message),
and take 3.06–3.09 s with this consumer (``bench/bench_consumer.py``; 3.10–3.12 s on the same host when it
polled every 3 ms instead of waiting for an ack). Here, a pass that may not fetch is
not counted and asks nothing of Redis: it waits until a worker thread acknowledges a message (the worker
thread acks through the consumer, which wakes it) or ``AT_CAPACITY_WAIT`` passes, so the consumer's loop
still moves delayed messages whose time has come. The backoff still applies once the queue itself is
empty, so an idle worker polls as seldom as before. RabbitMQ pushes messages to its consumers, so its
broker is left as it is.
"""

from __future__ import annotations

import threading
from typing import Any

from dramatiq.brokers.redis import RedisBroker, _RedisConsumer

#: the longest a consumer whose every prefetched message is being worked on waits for one to be acknowledged
#: before its loop looks at the delayed messages and asks again
AT_CAPACITY_WAIT = 0.05


class PromptConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, except that a pass at capacity neither asks Redis nor backs off: it waits
    for a thread to acknowledge its message, and fetches the next at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: set by every ack and nack (worker threads call them when they finish a message)
        self._freed = threading.Event()

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)
        finally:
            self._freed.set()

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)
        finally:
            self._freed.set()

    def __next__(self) -> Any:
        if not self.message_cache and self.outstanding_message_count >= self.prefetch:
            self.misses = 0
            # an ack since the last pass returns at once; the count is read again on the next pass, so an
            # ack between this wait and the clear is not lost
            self._freed.wait(AT_CAPACITY_WAIT)
            self._freed.clear()
            return None  # the consumer thread's loop handles delayed messages and asks again
        return super().__next__()


class PromptRedisBroker(RedisBroker):
    """``RedisBroker`` whose consumers are ``PromptConsumer`` (Dramatiq's ``consumer_class`` hook)."""

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return PromptConsumer
