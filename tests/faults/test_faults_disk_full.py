"""A full disk under the outbox: the run stops with one clear line, no torn line, resume finishes it."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.providers.outbox.gateway import read_outbox
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
    from dispatcher.providers.outbox.gateway import OutboxCorrupt

    project = sqlite_project
    project.outbox.write_bytes(b'{"key": "a", "run_id": "r"}\n{"key": "b", "ru\n{"key": "c", "run_id": "r"}\n')
    with pytest.raises(OutboxCorrupt, match=":2: unreadable"):
        list(read_outbox(project.outbox))


def test_delivery_log_on_a_full_disk_stops_the_run_with_one_line_and_resume_reconciles(
    sqlite_project: Project, small_disk: Path
) -> None:
    """The database cannot take the results of messages already handed over: the run says so once and
    exits non-zero; the results wait in the spool, and `resume` settles every row from the gateway."""
    project = sqlite_project
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    project.env.update(
        {"DISPATCH_DATABASE_URL": f"sqlite:///{small_disk / 'dispatch.db'}", "DISPATCH_OUTBOX_LATENCY_MS": "10"}
    )
    project.registry(size=600, seed=62)
    run = project.popen("run", CAMPAIGN, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    filler = small_disk / "filler"
    try:
        deadline = time.monotonic() + 60
        while not (project.outbox.exists() and project.outbox.stat().st_size > 4000):
            assert time.monotonic() < deadline and run.poll() is None, "sending must start"
            time.sleep(0.05)
        # the disk fills up under the database while the run is sending
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, err[-2000:]
    plain = [line for line in err.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1 and "cannot be written" in plain[0] and "dispatch resume" in plain[0], plain
    run_id = plain[0].split()[1]
    filler.unlink()
    resumed = project.dispatch("resume", run_id, "--json", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_recovery(project, run_id)
