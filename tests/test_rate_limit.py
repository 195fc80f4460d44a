"""The shared gateway pacer: even spacing, one schedule across clients and across worker processes."""

from __future__ import annotations

import bisect
import itertools
import json
import signal
import subprocess
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from dispatcher.providers.outbox.gateway import read_outbox
from dispatcher.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from tests.conftest import wait_started

if TYPE_CHECKING:
    from tests.conftest import Project


#: the clocks' resolution: SQLite reads its clock to the millisecond
RESOLUTION = 0.005


def reserve_window(limiter: RateLimiter, cost: float = 1.0) -> tuple[float, float]:
    """When the slot ``reserve`` gave falls, on this process's clock: its wait counts from the moment the
    schedule (Redis, the database) read its own clock, which lies between the call's start and its end. A
    loaded host can stretch a round trip by tens of milliseconds, so subtracting two waits measured at
    different moments would compare the schedule with the round trips."""
    start = time.monotonic()
    wait = limiter.reserve(cost)
    end = time.monotonic()
    return start + wait, end + wait


def assert_gap(earlier: tuple[float, float], later: tuple[float, float], gap: float) -> None:
    """The two slots lie ``gap`` apart: as far as the windows they fall in tell, to the clocks' resolution."""
    assert later[0] - earlier[1] - RESOLUTION <= gap <= later[1] - earlier[0] + RESOLUTION


def test_memory_limiter_hands_out_evenly_spaced_slots_instead_of_rejecting() -> None:
    limiter = MemoryRateLimiter(10)
    waits = [limiter.reserve() for _ in range(5)]
    assert waits[0] == pytest.approx(0.0, abs=0.01)
    for a, b in itertools.pairwise(waits):
        assert b - a == pytest.approx(limiter.interval, abs=0.005)


def test_memory_limiter_charges_parts_as_cost() -> None:
    limiter = MemoryRateLimiter(10)
    limiter.reserve(3)  # a three-part message takes three slots
    assert limiter.reserve(1) == pytest.approx(3 * limiter.interval, abs=0.01)


def test_redis_limiter_is_one_schedule_for_every_client(redis_url: str) -> None:
    import redis

    key = f"dispatch-test-{uuid.uuid4().hex[:8]}:ratelimit:outbox"
    a = RedisRateLimiter(redis.Redis.from_url(redis_url), key, 20)
    b = RedisRateLimiter(redis.Redis.from_url(redis_url), key, 20)
    try:
        start = time.monotonic()
        slots = [reserve_window(limiter) for limiter in (a, b, a, b, a, b)]
        assert slots[0][0] - start < 0.02  # the first slot is now
        for earlier, later in itertools.pairwise(slots):
            assert_gap(earlier, later, a.interval)
    finally:
        a.client.delete(key)


def test_database_limiter_is_one_schedule_for_every_client(database_url: str) -> None:
    from dispatcher.ratelimit import DatabaseRateLimiter
    from dispatcher.store import open_store

    stores = [open_store(database_url), open_store(database_url)]  # two clients, as two processes have
    try:
        a, b = (DatabaseRateLimiter(store, "dispatch:ratelimit:outbox", 20) for store in stores)
        start = time.monotonic()
        slots = [reserve_window(limiter) for limiter in (a, b, a, b, a, b)]
        assert slots[0][0] - start < 0.02  # the first slot is now
        for earlier, later in itertools.pairwise(slots):
            assert_gap(earlier, later, a.interval)
        assert_gap(slots[-1], reserve_window(a, 3), a.interval)  # after the last slot...
        assert_gap(slots[-1], reserve_window(b), 4 * a.interval)  # ...three parts take three
    finally:
        for store in stores:
            store.close()


def test_a_bad_rate_setting_is_a_one_line_error(project: Project) -> None:
    result = project.dispatch("runs", env={"DISPATCH_RATE_LIMIT": "fast"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "DISPATCH_RATE_LIMIT" in result.stderr


@pytest.mark.slow
def test_three_worker_processes_together_never_exceed_the_limit(broker_project: Project) -> None:
    # on RabbitMQ (no DISPATCH_REDIS_URL) the three processes share the schedule in the database
    project = broker_project
    project.env.update({"DISPATCH_RATE_LIMIT": "40", "DISPATCH_BATCH_SIZE": "20"})
    project.registry(size=260, seed=31)
    logs = [project.root / "var" / f"worker-{i}.log" for i in range(3)]
    workers = [
        project.popen("worker", "--threads", "2", stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs
    ]
    try:
        wait_started(*logs)
        result = project.dispatch("run", "campaigns/quarterly-themes.yaml", "--json", timeout=120)
        assert result.returncode == 0, result.stderr
        run_id = json.loads(result.stdout)["run_id"]
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
    lines = [line for line in read_outbox(project.outbox) if line["run_id"] == run_id]
    stamps = sorted(datetime.fromisoformat(line["at"]).timestamp() for line in lines)
    assert len(stamps) > 150
    worst = max(bisect.bisect_left(stamps, t + 1.0) - i for i, t in enumerate(stamps))
    # limit + 1 is the contract (bench/bench_rate_limit.py measures it on a quiet host); one more is
    # tolerated here because a CI host running other suites can wake a paced sender ~50 ms late.
    # An unpaced or per-process limiter sends hundreds in a second and fails this by far.
    assert worst <= 42, f"{worst} messages in one second with a limit of 40"
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert 0.85 * 40 <= rate <= 41, f"paced at {rate:.1f} msg/s"
    # all three processes shared the work
    senders = {a.claimed_by for a in project.runtime().store.deliveries(run_id) if a.state == "sent"}
    assert len(senders) == 3
