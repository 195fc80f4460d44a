"""A bare Dramatiq worker process with a no-op actor: the baseline our pipeline is compared with.

Usage: noop_worker.py REDIS_URL NAMESPACE THREADS. Runs until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

import dramatiq
from dramatiq.brokers.redis import RedisBroker


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
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    print("ready", flush=True)
    stop.wait()
    worker.stop()


if __name__ == "__main__":
    main()
