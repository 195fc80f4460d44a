"""Lanes: urgent runs have their own queue, jump a bulk backlog, and `--queues` chooses lanes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from dispatcher.providers.outbox.gateway import read_outbox
from tests.conftest import wait_for, wait_started

if TYPE_CHECKING:
    from tests.conftest import Project

pytestmark = pytest.mark.slow
URGENT = "\npriority: urgent\nreason: 预警中心：本网格正发生冒充公检法诈骗\n"


_wait = wait_for


def _worker(project: Project, name: str, *args: str) -> subprocess.Popen[str]:
    log = project.root / "var" / f"{name}.log"
    proc = project.popen("worker", *args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_started(log)
    return proc


def _stop(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)


def _urgent_campaign(project: Project) -> str:
    text = (project.root / "campaigns/refund-scam-lucheng.yaml").read_text(encoding="utf-8")
    text = text.replace("id: refund-scam-lucheng", "id: urgent-alert")
    text = text.replace("  districts: [lucheng, dingyan]", "  districts: [dingyan]\n  grids: [DY-01, DY-02]")
    project.write("campaigns/urgent-alert.yaml", text + URGENT)
    return "campaigns/urgent-alert.yaml"


def _run(project: Project, campaign: str) -> dict:  # type: ignore[type-arg]
    result = project.dispatch("run", campaign, "--no-wait", "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    st["pending"] = st["total"] - st["counts"].get("skipped", 0)
    return st


def _stamps(project: Project, run_id: str) -> list[float]:
    return sorted(
        datetime.fromisoformat(line["at"]).timestamp()
        for line in read_outbox(project.outbox)
        if line["run_id"] == run_id
    )


def test_urgent_run_starts_at_once_behind_a_bulk_backlog(broker_project: Project) -> None:
    project = broker_project
    # one worker, every bulk thread busy for ~20 s: 2,000 recipients paced at 100/s
    project.env.update({"DISPATCH_RATE_LIMIT": "100", "DISPATCH_BATCH_SIZE": "100"})
    project.registry(size=2500, seed=41)
    urgent_campaign = _urgent_campaign(project)
    worker = _worker(project, "worker", "--threads", "2")
    try:
        bulk = _run(project, "campaigns/quarterly-themes.yaml")
        _wait(lambda: len(_stamps(project, bulk["run_id"])) >= 50, 30, "bulk sending")
        urgent = _run(project, urgent_campaign)
        _wait(lambda: len(_stamps(project, urgent["run_id"])) >= 1, 10, "the first urgent message")
        first = _stamps(project, urgent["run_id"])[0] - float(urgent["enqueued_at"])
        assert first < 2.0, f"the urgent run waited {first:.2f}s behind the bulk backlog"
        _wait(lambda: len(_stamps(project, urgent["run_id"])) == urgent["pending"], 30, "the urgent run")
        assert len(_stamps(project, bulk["run_id"])) < bulk["pending"], "bulk finished first: no backlog was tested"
        project.dispatch("cancel", bulk["run_id"])
    finally:
        _stop(worker)


def test_alerts_start_at_once_while_every_bulk_thread_is_in_a_long_batch(redis_project: Project) -> None:
    # Redis only: the guarantee is the lane workers' split (no bulk worker consumes the urgent lane),
    # which is the same code on either broker; the urgent lane on RabbitMQ is checked by the test above
    project = redis_project
    # one worker, its 2 bulk threads each in a batch of 200 paced at 25/s (8 s a batch): an alert
    # fetched by a bulk thread's worker would wait for one of them to finish
    project.env.update({"DISPATCH_RATE_LIMIT": "50", "DISPATCH_BATCH_SIZE": "200"})
    project.registry(size=3000, seed=43)
    project.write("alerting.yaml", "steps:\n  - {after: 0s, action: sms}\n")
    worker = _worker(project, "worker", "--threads", "2")
    try:
        bulk = _run(project, "campaigns/quarterly-themes.yaml")
        _wait(lambda: len(_stamps(project, bulk["run_id"])) >= 20, 30, "bulk sending")
        waited: list[float] = []
        for i in range(10):
            result = project.dispatch("alert", "send", "--phone", f"1370000{i:04d}", "--type", "refund", "--json")
            returned = time.time()
            assert result.returncode == 0, result.stderr
            run_id = json.loads(result.stdout)["fired"][0]
            _wait(lambda run_id=run_id: len(_stamps(project, run_id)) == 1, 15, "the alert's SMS")
            # from the command returning, so after the message was enqueued: an upper bound of the wait
            waited.append(_stamps(project, run_id)[0] - returned)
        assert max(waited) < 1.0, f"alerts waited behind bulk batches: {[round(w, 2) for w in waited]}"
        assert len(_stamps(project, bulk["run_id"])) < bulk["pending"], "bulk finished first: no backlog was tested"
        project.dispatch("cancel", bulk["run_id"])
    finally:
        _stop(worker)


def test_queues_option_chooses_lanes(broker_project: Project) -> None:
    project = broker_project
    project.registry(size=400, seed=42)
    urgent_campaign = _urgent_campaign(project)
    bulk_only = _worker(project, "bulk-worker", "--queues", "bulk", "--threads", "2")
    urgent_only = None
    try:
        urgent = _run(project, urgent_campaign)
        bulk = _run(project, "campaigns/refund-scam-lucheng.yaml")
        _wait(lambda: len(_stamps(project, bulk["run_id"])) == bulk["pending"], 30, "the bulk run")
        assert _stamps(project, urgent["run_id"]) == [], "a bulk-only worker took urgent work"
        urgent_only = _worker(project, "urgent-worker", "--queues", "urgent", "--threads", "1")
        _wait(lambda: len(_stamps(project, urgent["run_id"])) == urgent["pending"], 30, "the urgent run")
    finally:
        _stop(bulk_only, *([urgent_only] if urgent_only else []))
