"""The broker restarted empty: the run is seen stalled, and the scheduler's watchdog brings it home.

A private Redis is killed and restarted empty. RabbitMQ is the shared server, which no test may
stop: its "restart empty" is the test's vhost deleted and made again (every queue, message and
connection of the deployment gone), which is what its clients see of a server that lost its data.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import Project, empty_vhost, stop_processes, wait_for
from tests.faults.support import PrivateRedis, check_recovery, start_run, status, wait_done, wait_log, worker

pytestmark = pytest.mark.slow


def _scheduler(project: Project) -> subprocess.Popen[str]:
    empty = project.root / "no-schedules"
    empty.mkdir(exist_ok=True)
    log = (project.root / "var" / "scheduler.log").open("w")
    return project.popen("scheduler", "--campaigns", str(empty), stdout=log, stderr=subprocess.STDOUT)


def _lose_the_broker(project: Project, redis: PrivateRedis, run_id: str) -> None:
    wait_for(lambda: status(project, run_id)["counts"].get("sent", 0) > 300, 60, "sending to start")
    redis.kill()
    redis.start()  # empty: every queued batch is gone


def test_a_run_whose_broker_lost_its_queues_shows_stalled_and_the_watchdog_finishes_it(
    pg_redis_project: Project, private_redis: PrivateRedis
) -> None:
    project = pg_redis_project
    project.env.update(
        {"DISPATCH_OUTBOX_LATENCY_MS": "5", "DISPATCH_BATCH_SIZE": "100", "DISPATCH_STALL_AFTER": "3",
         "DISPATCH_WATCHDOG_EVERY": "1"}
    )  # fmt: skip
    project.registry(size=3000, seed=101)
    procs = [worker(project, "w1"), worker(project, "w2")]
    try:
        run_id = start_run(project)
        _lose_the_broker(project, private_redis, run_id)
        seen: list[str] = []

        def says_stalled() -> bool:
            out = project.dispatch("status", run_id)
            seen.append(out.stdout)
            return "stalled:" in out.stdout and "last progress at" in out.stdout

        wait_for(says_stalled, 30, "status to say the run is stalled", interval=1)
        print("\n" + next(line for line in seen[-1].splitlines() if line.startswith("stalled:")))
        procs.append(_scheduler(project))
        wait_done(project, run_id, 90)
        wait_log(project.root / "var" / "scheduler.log", "watchdog.requeued", 5)
        check_recovery(project, run_id)
    finally:
        stop_processes(procs)


def test_the_watchdog_notices_a_broker_that_lost_its_data_at_once(
    pg_broker_project: Project, broker_kind: str, request: pytest.FixtureRequest
) -> None:
    project = pg_broker_project
    project.env.update(
        {"DISPATCH_OUTBOX_LATENCY_MS": "5", "DISPATCH_BATCH_SIZE": "100", "DISPATCH_STALL_AFTER": "600",
         "DISPATCH_WATCHDOG_EVERY": "1"}
    )  # fmt: skip
    project.registry(size=3000, seed=102)
    procs = [worker(project, "w1"), worker(project, "w2"), _scheduler(project)]
    try:
        wait_log(project.root / "var" / "scheduler.log", "scheduler.leader", 30)
        run_id = start_run(project)
        if broker_kind == "redis":
            _lose_the_broker(project, request.getfixturevalue("private_redis"), run_id)
        else:
            wait_for(lambda: status(project, run_id)["counts"].get("sent", 0) > 300, 60, "sending to start")
            empty_vhost(project.env["DISPATCH_BROKER_URL"])
        lost_at = time.monotonic()
        wait_log(project.root / "var" / "scheduler.log", "watchdog.broker_lost", 30)
        print(f"\nbroker loss noticed {time.monotonic() - lost_at:.1f}s after the restart")
        wait_done(project, run_id, 90)
        check_recovery(project, run_id)
    finally:
        stop_processes(procs)
