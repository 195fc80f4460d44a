"""How long a busy worker's thread waits for its next message: Dramatiq's Redis consumer against ours.

Usage: python bench/bench_consumer.py [MESSAGES]. A worker of 4 threads that prefetches one message per
thread (as ``dispatch worker`` does) is given messages that each sleep 100 ms, all enqueued first; the
least it can take is MESSAGES x 0.1 s / 4. Prints the time each consumer took and what it lost per message.
Needs Redis (DISPATCH_TEST_REDIS_URL, default redis://127.0.0.1:6379/0; `scripts/with_redis.py` starts one).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import dramatiq
from dramatiq.brokers.redis import RedisBroker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dispatcher.redis_broker import PromptRedisBroker
from dispatcher.workers import _worker

REDIS_URL = os.environ.get("DISPATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
THREADS = 4
SECONDS = 0.1


def one(broker_class: type[RedisBroker], n: int) -> float:
    namespace = f"bench-consumer-{uuid.uuid4().hex[:6]}"
    broker = broker_class(url=REDIS_URL, namespace=namespace)
    done: list[int] = []

    def work(i: int) -> None:
        time.sleep(SECONDS)
        done.append(i)

    actor = dramatiq.actor(work, broker=broker, actor_name="work", queue_name="work", max_retries=0)
    for i in range(n):
        actor.send(i)
    worker = _worker(broker, {"work"}, THREADS)
    start = time.perf_counter()
    worker.start()
    while len(done) < n:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    worker.stop()
    for key in broker.client.scan_iter(f"{namespace}*"):
        broker.client.delete(key)
    return elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    least = n * SECONDS / THREADS
    print(f"# {n} messages of {SECONDS * 1000:.0f} ms, {THREADS} threads prefetching one each; least {least:.2f} s")
    for label, cls in (("Dramatiq's RedisBroker", RedisBroker), ("PromptRedisBroker", PromptRedisBroker)):
        elapsed = one(cls, n)
        lost = (elapsed - least) / (n / THREADS) * 1000
        print(f"{label:24} {elapsed:6.2f} s   {lost:5.1f} ms lost per message per thread")


if __name__ == "__main__":
    main()
