"""Gateway pacing shared by every worker: reserve a slot, sleep until it, then send.

Dramatiq's stock limiters reject a caller that finds the window full and make it
back off for seconds, which turns a steady 50 msg/s contract into bursts and
gaps. Here each send *reserves* the next free slot on a virtual schedule (GCRA,
"theoretical arrival time"): slot = max(now, tat); tat = slot + cost / rate. The
caller learns exactly how long to wait and sleeps that long, so sends leave evenly
spaced and never more than ``rate + 1`` fall in any one-second window.

``RedisRateLimiter`` keeps the schedule in one Redis key updated by a Lua script
using Redis's own clock (``TIME``), so every worker process on every host shares
one schedule without trusting each other's clocks. ``DatabaseRateLimiter`` keeps it
in one row of the delivery log instead, for a RabbitMQ broker with no Redis beside it
(``Settings.coordination_redis_url``): RabbitMQ has no atomic counter to build a shared
schedule on, and the database is the one service every worker already reaches; one
upsert per send, timed by the database server's clock. ``MemoryRateLimiter`` is the
same algorithm for the embedded broker (threads of one process).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from .errors import BrokerError

if TYPE_CHECKING:
    from .settings import Settings
    from .store import SqlStore


#: slots are spaced for this share of the contracted rate. A sender that wakes a few tens of
#: milliseconds late (a busy host) sends closer to the next one; 2% of slack keeps even then no
#: more than rate + 1 messages in any one second, at a cost of 2% of throughput.
PACING_SHARE = 0.98


class RateLimiter:
    """Base: ``reserve(cost)`` returns seconds to wait before the send; ``acquire`` sleeps them."""

    def __init__(self, rate: float, share: float = PACING_SHARE) -> None:
        if rate <= 0:
            raise ValueError("rate must be more than 0")
        self.rate = rate
        #: seconds between two slots of cost 1
        self.interval = 1.0 / (rate * share)

    def reserve(self, cost: float = 1.0) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def acquire(self, cost: float = 1.0, sleep: Any = time.sleep) -> float:
        """Wait for this send's slot; returns the seconds waited."""
        wait = self.reserve(cost)
        if wait > 0:
            sleep(wait)
        return wait


class MemoryRateLimiter(RateLimiter):
    """One process's schedule (embedded broker): same algorithm as Redis, under a lock."""

    def __init__(self, rate: float, share: float = PACING_SHARE) -> None:
        super().__init__(rate, share)
        self._tat = 0.0
        self._lock = threading.Lock()

    def reserve(self, cost: float = 1.0) -> float:
        with self._lock:
            now = time.monotonic()
            slot = max(self._tat, now)
            self._tat = slot + cost * self.interval
            return slot - now


_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(tat, now)
local new_tat = slot + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 60000)
return slot - now
"""


class RedisRateLimiter(RateLimiter):
    """The schedule of every worker process, in one Redis key (one round trip per send)."""

    def __init__(self, client: Any, key: str, rate: float, share: float = PACING_SHARE) -> None:
        super().__init__(rate, share)
        self.client = client
        self.key = key
        self._script = client.register_script(_GCRA)

    def reserve(self, cost: float = 1.0) -> float:
        import redis

        try:
            wait_us = self._script(keys=[self.key], args=[int(cost * self.interval * 1_000_000)])
        except redis.RedisError as exc:
            raise BrokerError(f"rate limiter: cannot reach Redis: {exc}") from exc
        return max(0.0, int(wait_us) / 1_000_000)


class DatabaseRateLimiter(RateLimiter):
    """The schedule of every worker process, in one row of the delivery log (one upsert per send)."""

    def __init__(self, store: SqlStore, key: str, rate: float, share: float = PACING_SHARE) -> None:
        super().__init__(rate, share)
        self.store = store
        self.key = key

    def reserve(self, cost: float = 1.0) -> float:
        # a StoreError goes up as it is: the batch is retried like any other write to the log that failed
        wait_us = self.store.coordination.reserve_slot(self.key, int(cost * self.interval * 1_000_000))
        return wait_us / 1_000_000


def make_rate_limiter(settings: Settings, store: SqlStore | None = None) -> RateLimiter:
    """In-memory on the embedded broker; else Redis when there is one (``coordination_redis_url``),
    else the delivery log ``store`` (a RabbitMQ broker without DISPATCH_REDIS_URL)."""
    if settings.embedded:
        return MemoryRateLimiter(settings.rate_limit)
    key = f"{settings.broker_namespace}:ratelimit:{settings.gateway}"
    url = settings.coordination_redis_url
    if not url:
        if store is None:
            raise ValueError("a rate limiter without Redis needs the delivery log")
        return DatabaseRateLimiter(store, key, settings.rate_limit)
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - redis is a core dependency
        raise ImportError("the shared rate limiter needs redis-py: pip install redis") from exc
    client = redis.Redis.from_url(url)
    return RedisRateLimiter(client, key, settings.rate_limit)
