"""Prometheus metrics scraped over HTTP from real processes: `dispatch worker`, `dispatch web`, `dispatch scheduler`.

The counters are checked against the delivery log (`dispatch status RUN --json`, the
scheduler's recorded fires), and every scrape is searched for the registry's numbers.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from dispatcher.audience import generate, write_csv
from tests.conftest import Project, serve_web, stop_processes, wait_for
from tests.test_reports import registry_rows
from tests.test_scheduler import _only, _scheduled
from tests.test_webhooks import AUTH_TOKEN, PUBLIC_URL, rows, sent_run, twilio_peer  # noqa: F401 - fixtures

CAMPAIGN = "campaigns/quarterly-themes.yaml"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scrape:
    """One scrape of a ``/metrics`` endpoint, parsed with prometheus_client's own parser."""

    def __init__(self, url: str) -> None:
        started = time.perf_counter()
        response = httpx.get(url, timeout=5)
        self.seconds = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        self.text = response.text
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def values(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (s.labels, s.value)
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(value for _, value in self.values(name, **labels))


def _scrapable(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _worker(project: Project, port: int, log: Path) -> subprocess.Popen[str]:
    out = log.open("w")
    return project.popen("worker", "--threads", "2", "--metrics-port", str(port), stdout=out, stderr=subprocess.STDOUT)


def _status(project: Project, run_id: str) -> dict[str, Any]:
    result = project.dispatch("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _no_number_in(text: str, phones: set[str]) -> None:
    """No registry number, in any spelling a log or label might use (+86…, 86…, the bare 11 digits)."""
    digits = {p.removeprefix("+") for p in phones} | {p.removeprefix("+86") for p in phones}
    found = set(re.findall(r"\d{11,13}", text))
    assert not (found & digits), f"a phone number is in a scrape: {sorted(found & digits)[:3]}"


def test_worker_counters_by_outcome_equal_the_delivery_log_and_web_reads_the_queue_depth(
    redis_project: Project,
) -> None:
    project = redis_project
    project.env["DISPATCH_BATCH_SIZE"] = "30"
    csv_path = project.root / "var" / "residents.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as out:
        write_csv(generate(300, 21), out)
    rows = registry_rows(csv_path)
    phones = {r["phone"] for r in rows}
    failing = sorted(r["phone"] for r in rows if not r["opted_out"])[:3]
    # the outbox (the workers' gateway) refuses these for good: failed outcomes with an error code
    project.env["DISPATCH_OUTBOX_FAIL_PERMANENT"] = ",".join(failing)
    # paced by the shared limiter: every hand-over waits for a slot, and the run lasts long enough
    # (about 1.5 s) for both idle workers to take batches of it
    project.env["DISPATCH_RATE_LIMIT"] = "200"
    workers: list[subprocess.Popen[str]] = []
    # imported while the web process starts: each command's start-up takes seconds on a busy machine
    importing = project.popen("audience", "import", str(csv_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with serve_web(project, project.root / "var" / "web.log") as (base, _web):
        assert importing.wait(60) == 0, importing.stderr.read() if importing.stderr else ""
        # the run is enqueued before any worker exists: the web process must see its batches waiting
        created = project.dispatch("run", CAMPAIGN, "--no-wait", "--json")
        assert created.returncode == 0, created.stderr
        run_id = json.loads(created.stdout)["run_id"]
        batches = len(project.runtime().store.pending_batches(run_id))
        waiting = Scrape(f"{base}/metrics")
        assert waiting.total("dispatch_queue_up") == 1
        assert waiting.total("dispatch_queue_messages", lane="bulk", state="ready") == batches > 1
        assert waiting.total("dispatch_queue_messages", lane="urgent") == 0

        # paused while the workers start: one worker up seconds before the other would take every batch,
        # and the sums below must come from two exporters that both counted something
        assert project.dispatch("pause", run_id).returncode == 0
        ports = [_free_port(), _free_port()]
        try:
            workers = [_worker(project, port, project.root / "var" / f"w{i}.log") for i, port in enumerate(ports)]
            urls = [f"http://127.0.0.1:{port}/metrics" for port in ports]
            wait_for(lambda: all(_scrapable(u) for u in urls), 30, "the workers' metrics exporters")
            parked = lambda: Scrape(f"{base}/metrics").total("dispatch_queue_messages", lane="bulk") == 0  # noqa: E731
            wait_for(parked, 30, "the paused run's batches to be parked")
            resumed = project.dispatch("resume", run_id)
            assert resumed.returncode == 0, resumed.stderr
            store = project.runtime().store
            wait_for(lambda: store.control.run_status(run_id) == "completed", 45, "the run to complete")
            st = _status(project, run_id)
            scrapes = [Scrape(url) for url in urls]
        finally:
            stop_processes(workers)
        drained = Scrape(f"{base}/metrics")

    by_outcome: dict[str, float] = defaultdict(float)
    for scrape in scrapes:
        for labels, value in scrape.values("dispatch_messages_total", campaign="quarterly-themes"):
            assert labels["lane"] == "bulk" and labels["gateway"] == "outbox"
            by_outcome[labels["outcome"]] += value
    # people opted out before the run are settled `skipped` when it is created: no batch handles them
    expected = {**st["counts"], "skipped": st["counts"].get("skipped", 0) - sum(r["opted_out"] for r in rows)}
    assert {k: int(v) for k, v in by_outcome.items() if v} == {k: n for k, n in expected.items() if n}
    assert st["counts"]["failed"] == 3
    failed = sum(s.total("dispatch_messages_total", outcome="failed", error_code="outbox.rejected") for s in scrapes)
    assert failed == 3
    assert sum(s.total("dispatch_message_parts_total") for s in scrapes) == st["parts_sent"]
    assert sum(s.total("dispatch_batch_duration_seconds_count", lane="bulk", channel="sms") for s in scrapes) >= batches
    handed_over = st["counts"]["sent"] + st["counts"]["failed"]
    assert sum(s.total("dispatch_rate_limiter_wait_seconds_count") for s in scrapes) == handed_over
    # both processes took part, so the figures are the sum of two real exporters, not one
    assert all(s.total("dispatch_messages_total") > 0 for s in scrapes)
    assert drained.total("dispatch_queue_messages", lane="bulk", state="ready") == 0
    for scrape in [waiting, drained, *scrapes]:
        _no_number_in(scrape.text, phones)
    print(f"scrape seconds: web {waiting.seconds:.4f} / {drained.seconds:.4f}, worker {scrapes[0].seconds:.4f}")


def test_scheduler_exports_its_leadership_and_each_missed_fire(redis_project: Project) -> None:
    project = redis_project
    sh = ZoneInfo("Asia/Shanghai")
    _scheduled(project, "hourly", "  interval: 1h\n  misfire_grace: 1h\n")
    _only(project, "hourly")
    project.registry(size=20, seed=4)
    store = project.runtime().store
    # a scheduler fired 09:00, then none ran until 14:30: 10:00-13:00 are missed beyond the grace, 14:00 made up
    store.coordination.record_fire(
        "hourly", datetime(2023, 5, 10, 9, 0, tzinfo=sh), "fired", scheduler="an earlier one"
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log = (project.root / "var" / "scheduler.log").open("w")
    proc = project.popen(
        "scheduler", "--metrics-port", str(port),
        env={"DISPATCH_FAKE_NOW": "2023-05-10T14:30:00+08:00"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: _scrapable(url), 30, "the scheduler's metrics exporter")
        wait_for(lambda: Scrape(url).total("dispatch_scheduler_fires_total", campaign="hourly") == 1, 30, "the fire")
        scrape = Scrape(url)
    finally:
        stop_processes([proc])
    fires = store.coordination.list_fires("hourly")
    skipped = [f for f in fires if f.status == "skipped"]
    assert len(skipped) == 4
    assert scrape.total("dispatch_scheduler_missed_fires_total", campaign="hourly") == len(skipped)
    assert scrape.total("dispatch_scheduler_leader") == 1


def test_a_metrics_port_in_use_is_a_one_line_error(redis_project: Project) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = redis_project.dispatch("worker", "--metrics-port", str(port), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_delivery_report_lag_is_observed_from_sent_at_when_a_signed_callback_moves_a_row(
    sent_run: Any,  # noqa: F811 - the webhook tests' fixture, imported above
) -> None:
    project, run_id, rt = sent_run
    row = rows(rt, run_id)[0]
    sent_at = row.sent_at
    assert sent_at is not None
    # the web process's clock reads 90 s after the hand-over: the report comes a minute and a half later
    later = (sent_at + timedelta(seconds=90)).isoformat()
    with serve_web(project, project.root / "var" / "web.log", DISPATCH_FAKE_NOW=later) as (base, _web):
        assert Scrape(f"{base}/metrics").total("dispatch_delivery_report_lag_seconds_count") == 0
        params = {"MessageSid": row.provider_id, "MessageStatus": "delivered"}
        path = "/webhooks/twilio/status"
        signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, params)
        assert httpx.post(base + path, data=params, headers={"X-Twilio-Signature": signature}).status_code == 204
        scrape = Scrape(f"{base}/metrics")
    lag = {"gateway": "twilio", "status": "delivered"}
    assert scrape.total("dispatch_delivery_report_lag_seconds_count", **lag) == 1
    assert 90 <= scrape.total("dispatch_delivery_report_lag_seconds_sum", **lag) < 120
    assert scrape.total("dispatch_delivery_report_lag_seconds_bucket", le="60.0", **lag) == 0
    assert scrape.total("dispatch_delivery_report_lag_seconds_bucket", le="120.0", **lag) == 1
    _no_number_in(scrape.text, {row.phone})


def test_a_scrape_still_answers_while_the_broker_is_unreachable(project: Project) -> None:
    # nothing listens on this port: the moment Redis is away is when the on-call engineer scrapes
    broker = f"redis://127.0.0.1:{_free_port()}/0"
    with serve_web(project, project.root / "var" / "web.log", DISPATCH_BROKER_URL=broker) as (base, _web):
        scrape = Scrape(f"{base}/metrics")
    assert scrape.total("dispatch_queue_up") == 0
    assert scrape.values("dispatch_queue_messages") == []
    assert scrape.total("process_resident_memory_bytes") > 0
