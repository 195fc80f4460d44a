"""A bare Dramatiq worker process with a no-op actor: the baseline our pipeline is compared with.

Usage: noop_worker.py REDIS_URL NAMESPACE THREADS. Runs until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

import dramatiq
from dramatiq.brokers.redis import RedisBroker

#: the worker's idle timeout at which this baseline processed the most messages a second (see ``main``)
BEST_TIMEOUT_MS = 2


def declare(url: str, namespace: str) -> tuple[RedisBroker, dramatiq.Actor]:  # type: ignore[type-arg]
    broker = RedisBroker(url=url, namespace=namespace)

    def noop(i: int) -> None:
        return None

    actor = dramatiq.actor(noop, broker=broker, actor_name="noop", queue_name="noop", max_retries=0)
    return broker, actor


def main() -> None:
    url, namespace, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    broker, _ = declare(url, namespace)
    broker.emit_after("process_boot")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # the idle timeout is also the longest Dramatiq's Redis consumer sleeps between fetches once it has
    # fetched nothing a few times, which a consumer whose prefetched messages are all taken counts as
    # well: at 100 ms (and at 20) two of these processes handled 4,177-4,341 no-op messages a second,
    # at 5 ms 6,756-7,174, at 2 ms 7,255-8,139, at 1 ms 6,716-7,364 (three runs each, 20,000 messages).
    # The baseline is bare Dramatiq at its best, so 2 ms
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=BEST_TIMEOUT_MS)
    worker.start()
    print("ready", flush=True)
    stop.wait()
    worker.stop()


if __name__ == "__main__":
    main()
