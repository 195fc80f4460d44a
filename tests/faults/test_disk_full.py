"""A full disk under the outbox: the run stops with one clear line, no torn line, resume finishes it."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.gateways.outbox import read_outbox
from tests.conftest import Project, missing_service
from tests.faults.support import CAMPAIGN, check_recovery

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 KiB tmpfs: room for a few dozen outbox lines."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        missing_service(f"cannot mount a tmpfs (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_outbox_on_a_full_disk_stops_the_run_with_one_line_and_resume_sends_the_rest_once(
    sqlite_project: Project, small_disk: Path
) -> None:
    project = sqlite_project
    project.env["DISPATCH_OUTBOX_PATH"] = str(small_disk / "outbox.jsonl")
    project.registry(size=400, seed=61)
    started = time.monotonic()
    result = project.dispatch("run", CAMPAIGN, "--json", timeout=90)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-2000:]
    plain = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1, plain
    assert "cannot be written" in plain[0] and "No space left" in plain[0] and "dispatch resume" in plain[0]
    assert len(result.stderr.splitlines()) < 60, "the failure must not flood the log"
    print(f"\nrun stopped after {took:.1f}s with: {plain[0]}")
    run_id = plain[0].split()[1]
    # whole lines only: every line of the outbox parses (a torn line would raise OutboxCorrupt)
    lines = list(read_outbox(project.outbox))
    assert project.outbox.read_bytes().endswith(b"\n")
    assert 0 < len(lines) < 300
    st = json.loads(project.dispatch("status", run_id, "--json").stdout)
    assert st["counts"].get("sending", 0) == 0 and st["halted"], st
    # the operator frees space and resumes
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resumed = project.dispatch("resume", run_id, "--json", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["status"] == "completed"
    check_recovery(project, run_id)


def test_an_unreadable_outbox_line_is_an_error_not_a_skip(sqlite_project: Project) -> None:
    """resume relies on the outbox to know who was sent: a line it cannot read must stop it."""
    from dispatcher.gateways.outbox import OutboxCorrupt

    project = sqlite_project
    project.outbox.write_bytes(b'{"key": "a", "run_id": "r"}\n{"key": "b", "ru\n{"key": "c", "run_id": "r"}\n')
    with pytest.raises(OutboxCorrupt, match=":2: unreadable"):
        list(read_outbox(project.outbox))
