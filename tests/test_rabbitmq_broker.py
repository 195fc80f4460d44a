"""RabbitMQ as the broker: what a deployment without Redis gets in place of Redis's keys.

Errors reaching it are one line with the password masked; the lanes' depths come from
RabbitMQ's own counts; the watchdog's sentinel is a durable queue, so a server that lost
its data is noticed; without DISPATCH_REDIS_URL the pacing and the scheduler's lease are
the database's, with it they are Redis's. The workers, lanes, crash-resume, retries, pacing
and scheduler tests run on both brokers through the ``broker_kind`` fixture.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from dispatcher.broker import BULK_QUEUE, RETRY_QUEUE, URGENT_QUEUE, queue_depths
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import Project

SECRET = "s3cret-Pw"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_an_unreachable_rabbitmq_is_one_line_naming_it_without_the_password(project: Project) -> None:
    url = f"amqp://dispatch:{SECRET}@127.0.0.1:{_closed_port()}/%2F"
    for command in (("worker",), ("run", "campaigns/quarterly-themes.yaml", "--no-wait")):
        result = project.dispatch(*command, env={"DISPATCH_BROKER_URL": url}, timeout=60)
        assert result.returncode == 1, (command, result.stderr)
        line = result.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert "cannot reach the RabbitMQ broker at amqp://dispatch:***@127.0.0.1" in line, line
        assert SECRET not in result.stderr + result.stdout


def test_refused_rabbitmq_credentials_are_one_line_with_the_password_masked(
    project: Project, rabbitmq_url: str
) -> None:
    wrong = rabbitmq_url.replace("guest:guest@", f"guest:{SECRET}@")
    assert wrong != rabbitmq_url, "the test server's URL must carry guest credentials"
    result = project.dispatch("worker", env={"DISPATCH_BROKER_URL": wrong}, timeout=60)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "ACCESS_REFUSED" in line and "guest:***@" in line, line
    assert SECRET not in result.stderr


def test_a_bad_redis_url_beside_rabbitmq_is_a_one_line_setting_error(project: Project) -> None:
    result = project.dispatch("runs", env={"DISPATCH_REDIS_URL": "http://cache:6379"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "DISPATCH_REDIS_URL" in result.stderr


def test_without_redis_the_pacing_and_the_lease_are_the_databases_and_with_it_rediss(project: Project) -> None:
    from dispatcher.ratelimit import DatabaseRateLimiter, RedisRateLimiter
    from dispatcher.scheduler import DatabaseLease, RedisLease, make_lease

    project.env.update({"DISPATCH_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/%2F", "DISPATCH_RATE_LIMIT": "50"})
    alone = project.runtime()
    assert isinstance(alone.rate_limiter, DatabaseRateLimiter)
    assert isinstance(make_lease(alone, "holder"), DatabaseLease)
    project.env["DISPATCH_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    beside = project.runtime()
    assert isinstance(beside.rate_limiter, RedisRateLimiter)
    assert isinstance(make_lease(beside, "holder"), RedisLease)
    # a Redis broker is its own Redis: DISPATCH_REDIS_URL is not needed there
    project.env.pop("DISPATCH_REDIS_URL")
    project.env["DISPATCH_BROKER_URL"] = "redis://127.0.0.1:6379/0"
    assert isinstance(project.runtime().rate_limiter, RedisRateLimiter)


def test_queue_depths_on_rabbitmq_count_each_lanes_ready_and_delayed_batches(
    project: Project, rabbitmq_url: str
) -> None:
    from dispatcher.actors import declared

    project.env["DISPATCH_BROKER_URL"] = rabbitmq_url
    rt = project.runtime()
    assert queue_depths(rt.broker) == {
        lane: {"ready": 0, "delayed": 0} for lane in (BULK_QUEUE, RETRY_QUEUE, URGENT_QUEUE)
    }
    actors = declared(rt)
    for batch in range(3):
        actors["send_batch"].send("no-such-run", batch)
    actors["send_urgent_batch"].send("no-such-run", 0)
    for batch in range(2):
        actors["send_retry_batch"].send_with_options(args=("no-such-run", batch), delay=600_000)
    expected = {
        BULK_QUEUE: {"ready": 3, "delayed": 0},
        RETRY_QUEUE: {"ready": 0, "delayed": 2},
        URGENT_QUEUE: {"ready": 1, "delayed": 0},
    }
    wait_for(lambda: queue_depths(rt.broker) == expected, 10, f"the lanes to hold {expected}")


def test_watchdog_notices_a_rabbitmq_that_lost_its_queues(project: Project, rabbitmq_url: str) -> None:
    import pika

    from dispatcher.watchdog import SENTINEL, Watchdog

    project.env["DISPATCH_BROKER_URL"] = rabbitmq_url
    rt = project.runtime()
    watchdog = Watchdog(rt)
    assert watchdog.broker_lost() is False  # the first pass plants the sentinel
    planted = rt.store.coordination.get_marker(SENTINEL)
    assert planted and watchdog.broker_lost() is False  # still there
    # what a server that lost its data (or a vhost emptied by hand) looks like: the durable queue is gone
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    conn.channel().queue_delete(f"{rt.settings.broker_namespace}.sentinel.{planted}")
    conn.close()
    assert watchdog.broker_lost() is True
    assert rt.store.coordination.get_marker(SENTINEL) != planted  # a new sentinel, so the loss is told once
    assert watchdog.broker_lost() is False
