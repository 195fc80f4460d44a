"""Production shape: PostgreSQL, Redis or RabbitMQ, and separate `dispatch worker` processes, including kill -9."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher.providers.outbox.gateway import read_outbox
from tests.conftest import Project, stop_processes, wait_for, wait_started

CAMPAIGN = "campaigns/quarterly-themes.yaml"
pytestmark = pytest.mark.slow


def _status(project: Project, run_id: str) -> dict:  # type: ignore[type-arg]
    result = project.dispatch("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _worker(project: Project, log_name: str) -> subprocess.Popen[str]:
    log = (project.root / "var" / log_name).open("w")
    return project.popen("worker", "--threads", "2", stdout=log, stderr=subprocess.STDOUT)


_wait = wait_for


def _stop(*procs: subprocess.Popen[str]) -> None:
    stop_processes(procs)


def _check_exactly_once(project: Project, run_id: str) -> collections.Counter[str]:
    keys = collections.Counter(line["key"] for line in read_outbox(project.outbox) if line["run_id"] == run_id)
    rows = list(project.runtime().store.deliveries(run_id))
    eligible = {r.key for r in rows if r.reason != "opted_out"}
    assert [k for k, n in keys.items() if n > 1] == [], "someone was sent twice"
    assert set(keys) == eligible, f"missing {len(eligible - set(keys))}, unexpected {len(set(keys) - eligible)}"
    assert {r.key for r in rows if r.state == "sent"} == eligible
    return keys


def test_two_worker_processes_send_a_run_exactly_once(broker_project: Project) -> None:
    project = broker_project
    project.registry(size=3000, seed=11)
    workers = [_worker(project, "w1.log"), _worker(project, "w2.log")]
    try:
        # both ready first: on a quick host one worker finished a 12-batch run before the other consumed
        wait_started(project.root / "var" / "w1.log", project.root / "var" / "w2.log")
        result = project.dispatch("run", CAMPAIGN, "--json", timeout=180)
        assert result.returncode == 0, result.stderr
        st = json.loads(result.stdout)
        assert st["status"] == "completed" and st["open"] == 0
        _check_exactly_once(project, st["run_id"])
        # both processes took part
        claimed_by = {a for (a,) in _claimers(project, st["run_id"]) if a is not None}
        assert len(claimed_by) == 2, claimed_by
    finally:
        _stop(*workers)


def _claimers(project: Project, run_id: str):  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from dispatcher.store import schema as t

    with project.runtime().store.engine.connect() as conn:
        return conn.execute(
            sa.select(t.deliveries.c.claimed_by).where(t.deliveries.c.run_id == run_id).distinct()
        ).all()


def _kill_while_holding_rows(project: Project, run_id: str, victim: subprocess.Popen[str]) -> int:
    """SIGKILL the worker at a moment it holds claimed rows; returns how many it held.

    The worker is frozen (SIGSTOP) before its claims are read, so what was read is what it dies
    holding; between two batches it holds nothing, and is let go on for a moment.
    """
    import sqlalchemy as sa

    from dispatcher.store import schema as t

    store = project.runtime().store
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        os.kill(victim.pid, signal.SIGSTOP)
        with store.engine.connect() as conn:
            ids = {wid for (wid,) in conn.execute(sa.select(t.workers.c.id).where(t.workers.c.pid == victim.pid))}
        held = sum(n for holder, n in store.sending_holders(run_id).items() if holder in ids)
        if held:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            return held
        os.kill(victim.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the worker never held rows of the run: the kill could not land mid-batch")


def test_kill_9_of_a_worker_mid_run_then_resume_sends_everyone_exactly_once(broker_project: Project) -> None:
    project = broker_project
    project.env.update(
        {"DISPATCH_OUTBOX_LATENCY_MS": "3", "DISPATCH_BATCH_SIZE": "50", "DISPATCH_WORKER_STALE_AFTER": "3"}
    )
    project.registry(size=4000, seed=12)
    victim, survivor = _worker(project, "victim.log"), _worker(project, "survivor.log")
    replacement = None
    try:
        result = project.dispatch("run", CAMPAIGN, "--no-wait", "--json")
        assert result.returncode == 0, result.stderr
        run_id = json.loads(result.stdout)["run_id"]
        _wait(lambda: _status(project, run_id)["counts"].get("sent", 0) > 600, 60, "sending to start")
        held = _kill_while_holding_rows(project, run_id, victim)
        mid = _status(project, run_id)
        assert mid["open"] > 0, "the kill must land mid-run for this test to mean anything"
        replacement = _worker(project, "replacement.log")
        # the victim's claims stay in `sending` until resume; its heartbeat must first go stale
        time.sleep(4)  # let the victim's heartbeat go stale (DISPATCH_WORKER_STALE_AFTER=3)
        resumed = project.dispatch("resume", run_id, "--json", timeout=180)
        assert resumed.returncode == 0, resumed.stderr
        st = json.loads(resumed.stdout)
        assert st["open"] == 0 and st["status"] == "completed", st
        # the rows the victim died holding were found and settled by the resume
        assert st["resume"]["orphans"] == held, st["resume"]
        keys = _check_exactly_once(project, run_id)
        assert len(keys) == st["counts"]["sent"]
    finally:
        _stop(survivor, *([replacement] if replacement else []))
        if victim.poll() is None:
            victim.kill()


@contextlib.contextmanager
def _prompt_queue(redis_url: str, messages: int) -> Iterator[Any]:
    """A ``PromptRedisBroker`` in a namespace of its own with ``messages`` queued on ``work``; its consumer
    prefetches one, as a worker of one thread does."""
    import uuid

    import dramatiq

    from dispatcher.redis_broker import PromptRedisBroker

    namespace = f"t-consumer-{uuid.uuid4().hex[:6]}"
    broker = PromptRedisBroker(url=redis_url, namespace=namespace)

    def work(i: int) -> None:
        return None

    actor = dramatiq.actor(work, broker=broker, actor_name="work", queue_name="work")
    try:
        for i in range(messages):
            actor.send(i)
        yield broker
    finally:
        for key in broker.client.scan_iter(f"{namespace}*"):
            broker.client.delete(key)


def test_a_busy_workers_consumer_neither_asks_redis_nor_backs_off_and_fetches_once_a_thread_is_free(
    redis_url: str,
) -> None:
    # Dramatiq's own consumer counted each pass it could not fetch (every thread busy) as a miss and slept
    # longer after each, so a thread that finished waited up to the idle timeout for its next batch
    with _prompt_queue(redis_url, 3) as broker:
        consumer = broker.consume("work", prefetch=1, timeout=100)
        fetches: list[int] = []
        fetch = broker.do_fetch

        def counted(queue_name: str, prefetch: int) -> list[bytes]:
            fetches.append(prefetch)
            return fetch(queue_name, prefetch)  # type: ignore[no-any-return]

        broker.do_fetch = counted
        first = next(consumer)
        assert first is not None and fetches == [1]
        for _ in range(5):  # the one thread is busy: nothing to fetch, and no reason to wait longer each time
            assert next(consumer) is None
        assert fetches == [1] and consumer.misses == 0
        consumer.ack(first)
        second = next(consumer)  # the thread is free: the next message at once
        assert second is not None and second.message_id != first.message_id and fetches == [1, 1]
        consumer.ack(second)
        consumer.close()


def test_a_consumer_at_capacity_is_woken_by_a_threads_ack_rather_than_waiting_out_its_timeout(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # worker threads acknowledge through the consumer: the ack itself hands the consumer its next fetch
    import threading

    from dispatcher import redis_broker

    monkeypatch.setattr(redis_broker, "AT_CAPACITY_WAIT", 60.0)  # only an ack can end the wait in time
    with _prompt_queue(redis_url, 2) as broker:
        consumer = broker.consume("work", prefetch=1, timeout=100)
        first = next(consumer)
        assert first is not None
        passes: list[object] = []
        waiting = threading.Thread(target=lambda: passes.append(next(consumer)), daemon=True)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not passes  # at capacity: waiting, not polling
        consumer.ack(first)  # as a worker thread does when it finishes
        waiting.join(10)
        assert not waiting.is_alive() and passes == [None]  # woken well before the 60 s wait ran out
        second = next(consumer)
        assert second is not None and second.message_id != first.message_id
        consumer.ack(second)
        consumer.close()
