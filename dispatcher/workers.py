"""Running Dramatiq workers: in-process for the embedded broker, or as a ``dispatch worker`` process.

Each worker process registers itself in the ``workers`` table and beats every
couple of seconds; ``resume`` treats rows claimed by a worker without a recent
beat as orphaned (the process died with them in hand).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from dramatiq import Worker

from .actors import declared
from .broker import URGENT_QUEUE
from .errors import StoreError
from .spool import replay

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.worker")
HEARTBEAT_SECONDS = 2.0


class Heartbeat(threading.Thread):
    def __init__(self, runtime: Runtime, interval: float = HEARTBEAT_SECONDS) -> None:
        super().__init__(name="dispatch-heartbeat", daemon=True)
        self.runtime = runtime
        self.interval = interval
        self.stopped = threading.Event()

    def beat(self) -> None:
        try:
            self.runtime.store.heartbeat(self.runtime.worker_id, socket.gethostname(), os.getpid())
        except StoreError as exc:  # a missed beat is not fatal; the next one may succeed
            log.warning("worker.heartbeat_failed", error=str(exc))

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self.stopped.set()


def start_worker(
    runtime: Runtime, *, queues: set[str] | None = None, threads: int | None = None
) -> tuple[Worker, Heartbeat]:
    declared(runtime)  # the actors exist on the broker before consuming
    runtime.stopping.clear()
    try:
        replay(runtime)  # results a previous process of this host could not write
    except StoreError as exc:
        log.warning("worker.spool_replay_failed", error=str(exc))
    heartbeat = Heartbeat(runtime)
    heartbeat.beat()
    heartbeat.start()
    worker: Any
    urgent_threads = runtime.settings.urgent_threads
    if queues is None and urgent_threads > 0 and not runtime.settings.embedded:
        worker = LaneWorkers(runtime, threads or runtime.settings.worker_threads, urgent_threads)
    else:
        worker = _worker(runtime.broker, queues, threads or runtime.settings.worker_threads)
    worker.start()
    return worker, heartbeat


def _worker(broker: Any, queues: set[str] | None, threads: int) -> Worker:
    """A Dramatiq worker that fetches no more batches than it has threads.

    Dramatiq prefetches twice its threads by default. A batch is seconds of work (a provider's round
    trips), so the first worker to ask takes twice its share of a campaign's batches and holds them
    queued while other workers sit idle; one batch per thread keeps a run spread over every worker.
    """
    worker = Worker(broker, queues=queues, worker_threads=threads, worker_timeout=100)
    worker.queue_prefetch = threads
    return worker


class LaneWorkers:
    """One Dramatiq worker for the bulk lanes and a second, small one kept for the urgent lane alone.

    Dramatiq's actor priority only reorders messages a worker has already fetched: a worker whose
    threads are all in long bulk batches still fetches urgent messages (its consumers prefetch
    regardless of idle threads), and each then waits for one of those batches to finish, seconds
    on a busy run. So the bulk worker does not consume the urgent lane at all: every urgent
    message is fetched by the urgent worker, whose threads only ever hold urgent work, and starts
    at once behind any backlog. ``DISPATCH_URGENT_THREADS=0`` goes back to one worker on every lane.
    """

    def __init__(self, runtime: Runtime, threads: int, urgent_threads: int) -> None:
        # each Dramatiq worker registers its own consumer-adding middleware on the shared broker,
        # which Dramatiq warns about; here two workers on one broker is the intent
        runtime.broker.logger.addFilter(lambda record: "same type twice" not in record.getMessage())
        # every lane declared (bulk, bulk-retry; their delay queues follow them) but the urgent one
        lanes = {q for q in runtime.broker.get_declared_queues() if q != URGENT_QUEUE}
        self.bulk = _worker(runtime.broker, lanes, threads)
        self.urgent = _worker(runtime.broker, {URGENT_QUEUE}, urgent_threads)
        self.worker_threads = threads + urgent_threads

    def start(self) -> None:
        self.urgent.start()
        self.bulk.start()

    def stop(self, timeout: int = 600_000) -> None:
        self.bulk.stop(timeout=timeout)
        self.urgent.stop(timeout=timeout)

    def join(self) -> None:
        self.bulk.join()
        self.urgent.join()


def stop_worker(runtime: Runtime, worker: Worker, heartbeat: Heartbeat) -> None:
    # batches stop handing out sends at their next chunk, record what went out and release the rest
    # (re-queued for another worker), so the stop finishes well within Dramatiq's timeout
    runtime.stopping.set()
    worker.stop(timeout=30_000)
    heartbeat.stop()
    # unregistering is a courtesy: a worker left in the table simply goes stale
    with contextlib.suppress(StoreError):
        runtime.store.forget_worker(runtime.worker_id)


#: a worker process collects cyclic garbage after this many net allocations (Python's default: 700)
GC_THRESHOLD = 10_000


def tune_collector() -> None:
    """Keep Python's cyclic garbage collector from costing a worker process a fifth of its CPU.

    A batch allocates tens of thousands of objects (rows, outcomes, events, attempts). At Python's
    default threshold a worker ran a young collection every few hundred recipients, and each of the
    older ones walked every object the process made at start-up (SQLAlchemy, Jinja, Dramatiq): 0.43–0.46 s
    of the 2.3 s of CPU a worker spent on 50,000 recipients (timed with ``gc.callbacks`` in
    ``bench/bench_pipeline.py``). With those objects frozen out of the collector and a threshold of
    10,000, collections took 0.04–0.06 s and the workers' CPU per recipient fell from 0.046 to 0.037 ms.
    Reference counting still frees at once whatever is not part of a cycle; cycles wait a little longer.
    What is garbage already is collected before the freeze, which would otherwise keep it for good.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def serve(
    runtime: Runtime, *, queues: set[str] | None, threads: int | None, ready: Callable[[], None] | None = None
) -> None:
    """Run a worker until SIGTERM or SIGINT; finishes in-flight batches before exiting."""
    stop = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        log.info("worker.stopping", signal=signal.Signals(signum).name)
        runtime.stopping.set()
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    worker, heartbeat = start_worker(runtime, queues=queues, threads=threads)
    tune_collector()  # after start-up, whose objects live as long as the process
    log.info(
        "worker.started",
        worker_id=runtime.worker_id,
        queues=sorted(queues or []) or "all",
        threads=worker.worker_threads,
    )
    if ready:
        ready()
    while not stop.wait(0.5):
        pass
    stop_worker(runtime, worker, heartbeat)
    log.info("worker.stopped", worker_id=runtime.worker_id)


def stub_idle(runtime: Runtime) -> bool:
    """True when the embedded broker has no message queued, delayed or in flight."""
    queues = getattr(runtime.broker, "queues", {})
    return all(q.unfinished_tasks == 0 for q in queues.values())
