"""Pause, resume and cancel against real `dispatch worker` processes on Redis and PostgreSQL.

The workers are paced by the shared rate limiter (100 msg/s) so that a run lasts long
enough to be stopped in the middle; the outbox's own timestamps say when each message
was handed over, independent of the workers' clocks.
"""

from __future__ import annotations

import collections
import json
import subprocess
import time
from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from dispatcher.providers.outbox.gateway import read_outbox

if TYPE_CHECKING:
    from tests.conftest import Project

CAMPAIGN = "campaigns/quarterly-themes.yaml"
pytestmark = pytest.mark.slow


from tests.conftest import stop_processes, wait_for, wait_started  # noqa: E402 - shared helpers

_wait = wait_for


def _workers(project: Project, n: int) -> list[subprocess.Popen[str]]:
    procs = []
    for i in range(n):
        log = (project.root / "var" / f"worker-{i}.log").open("w")
        procs.append(project.popen("worker", "--threads", "2", stdout=log, stderr=subprocess.STDOUT))
    wait_started(*(project.root / "var" / f"worker-{i}.log" for i in range(n)))
    return procs


_stop = stop_processes


def _lines(project: Project, run_id: str) -> list[dict]:  # type: ignore[type-arg]
    return [line for line in read_outbox(project.outbox) if line["run_id"] == run_id]


def _start(project: Project) -> str:
    result = project.dispatch("run", CAMPAIGN, "--no-wait", "--json")
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["run_id"])


def _status(project: Project, run_id: str) -> dict:  # type: ignore[type-arg]
    result = project.dispatch("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _at(line: dict) -> float:  # type: ignore[type-arg]
    return datetime.fromisoformat(line["at"]).timestamp()


@pytest.fixture
def paced(redis_project: Project) -> Project:
    redis_project.env["DISPATCH_RATE_LIMIT"] = "100"
    redis_project.env["DISPATCH_BATCH_SIZE"] = "100"
    redis_project.registry(size=900, seed=21)
    return redis_project


def test_pause_stops_sends_within_2s_and_resume_sends_everyone_exactly_once(paced: Project) -> None:
    project = paced
    workers = _workers(project, 2)
    try:
        run_id = _start(project)
        _wait(lambda: len(_lines(project, run_id)) >= 150, 30, "sending to start")
        result = project.dispatch("pause", run_id, "--json")
        paused_at = time.time()  # the pause is recorded when the command returns, not when python starts
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["paused"] is True
        time.sleep(3.5)
        lines = _lines(project, run_id)
        late = [line for line in lines if _at(line) > paused_at + 2.0]
        assert late == [], f"{len(late)} messages went out more than 2 s after the pause"
        st = _status(project, run_id)
        assert st["status"] == "paused"
        assert st["counts"].get("sending", 0) == 0, "claimed rows were handed back"
        assert st["counts"]["pending"] > 0 and st["counts"]["sent"] == len(lines)

        result = project.dispatch("resume", run_id, "--no-wait", "--json")
        assert result.returncode == 0, result.stderr
        _wait(lambda: _status(project, run_id)["status"] == "completed", 60, "the resumed run to complete")
    finally:
        _stop(workers)
    keys = collections.Counter(line["key"] for line in _lines(project, run_id))
    rows = list(project.runtime().store.deliveries(run_id))
    eligible = {r.key for r in rows if r.reason != "opted_out"}
    assert [k for k, n in keys.items() if n > 1] == [], "someone was sent twice"
    assert set(keys) == eligible
    assert {r.key for r in rows if r.state == "sent"} == eligible


def test_cancel_leaves_nothing_pending_and_nothing_sent_after_it_settles(paced: Project) -> None:
    project = paced
    workers = _workers(project, 2)
    try:
        run_id = _start(project)
        _wait(lambda: len(_lines(project, run_id)) >= 100, 30, "sending to start")
        result = project.dispatch("cancel", run_id, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["cancelled"] > 0
        _wait(lambda: _status(project, run_id)["counts"].get("sending", 0) == 0, 10, "in-flight rows to settle")
        st = _status(project, run_id)
        time.sleep(1.0)
        assert len(_lines(project, run_id)) == st["counts"]["sent"], "a message went out after the cancel settled"
    finally:
        _stop(workers)
    assert st["status"] == "cancelled"
    assert st["open"] == 0 and "pending" not in st["counts"]
    assert st["counts"]["cancelled"] > 0
    assert sum(st["counts"].values()) == st["total"]
    # every cancelled row says why
    rows = [r for r in project.runtime().store.deliveries(run_id) if r.state == "cancelled"]
    assert rows and {r.reason for r in rows} == {"cancelled"}
    # every cancellation (by the command, or by a worker for rows it held) is in the ledger
    verify = project.dispatch("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_pause_of_an_unknown_run_is_a_one_line_error(project: Project) -> None:
    result = project.dispatch("pause", "no-such-run")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no-such-run" in result.stderr
    assert "Traceback" not in result.stderr
