"""`resume` right after a crash reconciles what the dead process held, and says why when it must wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import Project, wait_for
from tests.faults.support import CAMPAIGN, check_recovery

pytestmark = pytest.mark.slow


def _outbox_lines(project: Project) -> int:
    return project.outbox.read_bytes().count(b"\n") if project.outbox.exists() else 0


def test_resume_right_after_kill_9_of_the_run_reconciles_at_once_and_finishes(sqlite_project: Project) -> None:
    project = sqlite_project
    project.env.update({"DISPATCH_OUTBOX_LATENCY_MS": "15", "DISPATCH_BATCH_SIZE": "100"})
    project.registry(size=700, seed=71)
    run = project.popen("run", CAMPAIGN, "--json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _outbox_lines(project) > 60, 60, "sending to start")
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
    run_id = project.runtime().store.list_runs(limit=1)[0].id
    held = project.runtime().store.counts(run_id).get("sending", 0)
    assert held > 0, "the kill must land while rows are claimed"
    # at once: the dead process's heartbeat is still fresh, but its pid is gone
    resumed = project.dispatch("resume", run_id, "--json", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    st = json.loads(resumed.stdout)
    assert st["resume"]["orphans"] == held, st["resume"]
    assert st["open"] == 0 and st["status"] == "completed", st
    check_recovery(project, run_id)


def test_resume_exits_non_zero_naming_the_live_holder_while_rows_are_in_flight(sqlite_project: Project) -> None:
    project = sqlite_project
    project.env.update({"DISPATCH_OUTBOX_LATENCY_MS": "150", "DISPATCH_BATCH_SIZE": "60"})
    project.registry(size=200, seed=72)
    run = project.popen("run", CAMPAIGN, "--json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _outbox_lines(project) > 5, 60, "sending to start")
        os.kill(run.pid, signal.SIGSTOP)  # alive (heartbeat fresh, pid present) but not moving
        time.sleep(0.3)
        run_id = project.runtime().store.list_runs(limit=1)[0].id
        waiting = project.dispatch("resume", run_id, timeout=120)
        assert waiting.returncode == 1, waiting.stderr[-2000:]
        last = waiting.stderr.strip().splitlines()[-1]
        assert "still open" in last and "held by live workers" in last, last
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
    resumed = project.dispatch("resume", run_id, "--json", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_recovery(project, run_id)
