"""The scheduler: quarterly dates, themes per quarter, catch-up within the grace, exactly once, failover.

Fire times come from an injected clock (a ``SettableClock`` in-process, ``DISPATCH_CLOCK_OFFSET``
for subprocesses); leadership uses real time and, across processes, real Redis.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pytest
import structlog.testing

from dispatcher.clock import SettableClock
from dispatcher.runtime import Runtime
from dispatcher.scheduler import LEASE_NAME, DatabaseLease, Scheduler
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import Project

SH = ZoneInfo("Asia/Shanghai")
QUARTER_TEMPLATES = {
    1: "themes/brushing.sms.j2",
    2: "themes/impersonating_police.sms.j2",
    3: "themes/investment.sms.j2",
    4: "themes/loan.sms.j2",
}


def _scheduled(project: Project, name: str, schedule: str) -> Path:
    """A copy of the quarterly-themes campaign with another id and schedule."""
    text = (project.root / "campaigns/quarterly-themes.yaml").read_text(encoding="utf-8")
    head = text.split("schedule:")[0].replace("id: quarterly-themes", f"id: {name}")
    return project.write(f"campaigns/{name}.yaml", head + "schedule:\n" + schedule)


def _only(project: Project, *keep: str) -> None:
    for path in (project.root / "campaigns").glob("*.yaml"):
        if path.stem not in keep:
            path.unlink()


def _leads(log: Path) -> bool:
    """True if this scheduler's last leadership change (in its JSON log) made it the leader."""
    last = None
    for raw in log.read_text().splitlines():
        if '"scheduler.leader"' in raw or '"scheduler.follower"' in raw:
            last = json.loads(raw)["event"]
    return last == "scheduler.leader"


def _scheduler(project: Project, clock: SettableClock) -> tuple[Runtime, Scheduler]:
    rt = project.runtime(clock=clock)
    sched = Scheduler(rt, project.root / "campaigns", holder="test-scheduler")
    cwd = Path.cwd()
    os.chdir(project.root)  # templates_dir is relative to the project
    try:
        sched.load(strict=True)
    finally:
        os.chdir(cwd)
    return rt, sched


def test_quarterly_schedule_lists_the_right_shanghai_dates_and_themes_for_2021_to_2023(
    project: Project,
) -> None:
    result = project.dispatch(
        "schedule", "list", "--from", "2021-01-01", "--until", "2024-01-01", "--count", "50", "--json"
    )
    assert result.returncode == 0, result.stderr
    item = next(c for c in json.loads(result.stdout)["campaigns"] if c["campaign_id"] == "quarterly-themes")
    fires = [(f["fire_time"], f["template"]) for f in item["fires"]]
    expected = [
        (f"{year}-{month:02d}-05T10:00:00+08:00", QUARTER_TEMPLATES[(month - 1) // 3 + 1])
        for year in (2021, 2022, 2023)
        for month in (1, 4, 7, 10)
    ]
    assert fires == expected


def test_schedule_list_rejects_a_bad_date_with_one_line(project: Project) -> None:
    result = project.dispatch("schedule", "list", "--from", "next tuesday")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--from" in result.stderr and "Traceback" not in result.stderr


def test_themes_campaign_fires_once_per_quarter_with_that_quarters_template(project: Project) -> None:
    project.registry(size=30, seed=2)
    _only(project, "quarterly-themes")
    clock = SettableClock(datetime(2022, 1, 5, 10, 0, 20, tzinfo=SH))
    rt, sched = _scheduler(project, clock)
    for month in (1, 4, 7, 10):
        clock.set(datetime(2022, month, 5, 10, 0, 20, tzinfo=SH))
        assert sched.tick() == 1
        assert sched.tick() == 0  # the same fire again creates nothing
    runs = sorted(rt.store.list_runs(campaign_id="quarterly-themes"), key=lambda r: r.fire_time)
    assert [(r.fire_time, r.template_name) for r in runs] == [
        (datetime(2022, m, 5, 10, 0, tzinfo=SH).astimezone(UTC), QUARTER_TEMPLATES[(m - 1) // 3 + 1])
        for m in (1, 4, 7, 10)
    ]


def test_theme_follows_the_quarter_in_shanghai_not_in_utc(project: Project) -> None:
    # 00:30 on 1 April in Shanghai is still 31 March (Q1) in UTC: the Q2 theme must be used
    _scheduled(project, "april-first", "  cron: '30 0 1 4 *'\n  timezone: Asia/Shanghai\n")
    _only(project, "april-first")
    project.registry(size=20, seed=3)
    clock = SettableClock(datetime(2023, 4, 1, 0, 30, 5, tzinfo=SH))
    rt, sched = _scheduler(project, clock)
    assert sched.tick() == 1
    (run,) = rt.store.list_runs(campaign_id="april-first")
    assert run.template_name == QUARTER_TEMPLATES[2]


def test_missed_fires_are_made_up_within_the_grace_and_recorded_skipped_beyond_it(project: Project) -> None:
    _scheduled(project, "hourly", "  interval: 1h\n  misfire_grace: 1h\n")
    _only(project, "hourly")
    project.registry(size=20, seed=4)
    start = datetime(2023, 5, 10, 9, 0, 10, tzinfo=SH)
    clock = SettableClock(start)
    rt, sched = _scheduler(project, clock)
    assert sched.tick() == 1  # 09:00, first seen within the grace: made up once
    # no scheduler ran from 09:00 until 14:30: 10:00-13:00 are beyond the 1 h grace, 14:00 is not
    clock.set(datetime(2023, 5, 10, 14, 30, tzinfo=SH))
    assert sched.tick() == 1
    fires = rt.store.coordination.list_fires("hourly")
    by_hour = {f.fire_time.astimezone(SH).hour: f for f in fires}
    assert sorted(by_hour) == [9, 10, 11, 12, 13, 14]
    assert [by_hour[h].status for h in (9, 10, 11, 12, 13, 14)] == ["fired"] + ["skipped"] * 4 + ["fired"]
    assert "beyond misfire_grace 1h" in (by_hour[10].reason or "")
    runs = rt.store.list_runs(campaign_id="hourly")
    assert sorted(r.fire_time.astimezone(SH).hour for r in runs) == [9, 14]


def test_a_duplicate_fire_creates_nothing(project: Project) -> None:
    _only(project, "quarterly-themes")
    project.registry(size=20, seed=5)
    clock = SettableClock(datetime(2023, 7, 5, 10, 0, 1, tzinfo=SH))
    rt, sched = _scheduler(project, clock)
    entry = next(iter(sched.entries.values()))
    fire_time = datetime(2023, 7, 5, 10, 0, tzinfo=SH).astimezone(UTC)
    first = sched.fire(entry, fire_time)
    second = Scheduler(rt, project.root / "campaigns", holder="another", lease=sched.lease).fire(entry, fire_time)
    assert first == second
    assert len(rt.store.list_runs(campaign_id="quarterly-themes")) == 1
    assert len(rt.store.coordination.list_fires("quarterly-themes")) == 1


class _TakenOverAfterFirstRenewal:
    """The real database lease, which another scheduler takes right after this one's first renewal:
    what a leader finds that froze mid-pass for longer than its lease."""

    def __init__(self, runtime: Runtime, holder: str) -> None:
        self.inner = DatabaseLease(runtime, holder, 60)
        self.runtime, self.holder, self.holds = runtime, holder, 0

    def hold(self) -> bool:
        self.holds += 1
        held = self.inner.hold()
        if self.holds == 1:
            coordination = self.runtime.store.coordination
            coordination.release_lease(LEASE_NAME, self.holder)
            assert coordination.acquire_lease(LEASE_NAME, "the-new-leader", 60)
        return held

    def release(self) -> None:
        self.inner.release()


def test_a_leader_that_loses_its_lease_mid_pass_fires_nothing_and_logs_that_it_follows(project: Project) -> None:
    _scheduled(project, "hourly", "  interval: 1h\n  misfire_grace: 1h\n")
    _only(project, "hourly")
    project.registry(size=20, seed=4)
    rt, sched = _scheduler(project, SettableClock(datetime(2023, 5, 10, 9, 0, 10, tzinfo=SH)))
    sched.lease = _TakenOverAfterFirstRenewal(rt, sched.holder)
    with structlog.testing.capture_logs() as logs:
        assert sched.tick() == 0
        assert sched.tick() == 0
    events = [e["event"] for e in logs if e["event"].startswith("scheduler.")]
    # on-call reads leadership from these lines: the last one must not still say "leader"
    assert [e for e in events if e in ("scheduler.leader", "scheduler.follower")] == [
        "scheduler.leader",
        "scheduler.follower",
    ], events
    assert "scheduler.lease_lost" in events and "scheduler.fired" not in events
    assert not sched.is_leader
    assert rt.store.list_runs(campaign_id="hourly") == []
    assert rt.store.coordination.list_fires("hourly") == []


@pytest.mark.slow
def test_three_schedulers_fire_each_time_exactly_once_and_survive_killing_the_leader(
    broker_project: Project,
) -> None:
    # on Redis the lease is a Redis key; on RabbitMQ (no DISPATCH_REDIS_URL) it is the database's row
    project = broker_project
    _scheduled(project, "drill", "  interval: 5s\n  misfire_grace: 1h\n")
    _only(project, "drill")
    project.registry(size=20, seed=6)
    env = {"DISPATCH_SCHEDULER_LEASE": "3", "DISPATCH_SCHEDULER_TICK": "0.25"}
    logs = [project.root / "var" / f"scheduler-{i}.log" for i in range(3)]
    procs = [project.popen("scheduler", env=env, stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    killed_at = None
    leader = None
    try:
        time.sleep(12)

        def leaders_now() -> list[int]:
            return [i for i, log in enumerate(logs) if _leads(log)]

        # a leader a loaded host froze past its lease says it follows at its next renewal, within a tick
        wait_for(lambda: len(leaders_now()) == 1, 10, "exactly one scheduler to say it leads")
        leaders = leaders_now()
        assert len(leaders) == 1, leaders
        leader = leaders[0]
        procs[leader].send_signal(signal.SIGKILL)
        killed_at = time.time()
        time.sleep(18)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(20)
    survivors = [i for i in range(3) if i != leader]
    new_leaders = [i for i in survivors if _leads(logs[i])]
    assert len(new_leaders) >= 1
    result = project.dispatch("runs", "--campaign", "drill", "--limit", "100", "--json")
    assert result.returncode == 0, result.stderr
    fire_times = sorted(datetime.fromisoformat(r["fire_time"]) for r in json.loads(result.stdout)["runs"])
    assert len(fire_times) == len(set(fire_times)), "a fire time has two runs"
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fire_times)]
    assert gaps and set(gaps) == {5.0}, f"a fire was lost: gaps {gaps}"
    # 30 s of schedule at one fire per 5 s, including the ones due while the leader was dead
    assert len(fire_times) >= 5
    assert fire_times[-1].timestamp() > killed_at + 5


def test_changed_campaign_files_are_reloaded_and_a_broken_edit_keeps_the_last_good_version(
    project: Project,
) -> None:
    path = _scheduled(project, "reloaded", "  interval: 1h\n")
    _only(project, "reloaded")
    clock = SettableClock(datetime(2023, 5, 10, 9, 0, 10, tzinfo=SH))
    _rt, sched = _scheduler(project, clock)
    assert [e.loaded.campaign.schedule.interval for e in sched.entries.values()] == ["1h"]  # type: ignore[union-attr]
    cwd = Path.cwd()
    os.chdir(project.root)
    try:
        path.write_text(path.read_text(encoding="utf-8").replace("interval: 1h", "interval: 2h"), encoding="utf-8")
        sched.reload_if_changed()
        assert [e.loaded.campaign.schedule.interval for e in sched.entries.values()] == ["2h"]  # type: ignore[union-attr]
        path.write_text(path.read_text(encoding="utf-8").replace("interval: 2h", "interval: often"), encoding="utf-8")
        sched.reload_if_changed()
        assert [e.loaded.campaign.schedule.interval for e in sched.entries.values()] == ["2h"]  # type: ignore[union-attr]
    finally:
        os.chdir(cwd)


def test_scheduler_refuses_to_start_on_a_broken_campaign_with_one_line(project: Project) -> None:
    _scheduled(project, "broken", "  interval: sometimes\n")
    result = project.dispatch("scheduler", timeout=30)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("campaigns/broken.yaml:") and "schedule.interval" in line, line


def test_a_quarterly_day_missing_from_some_quarter_is_rejected_at_validation(project: Project) -> None:
    _scheduled(project, "feb-thirty", "  quarterly: {month: 2, day: 30, at: '09:00'}\n")
    result = project.dispatch("validate", "campaigns/feb-thirty.yaml")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("campaigns/feb-thirty.yaml:"), line
    assert "schedule.quarterly" in line and "day 30" in line


def test_yearly_campaign_fires_on_its_date_once_a_year(project: Project) -> None:
    _scheduled(project, "summer", '  yearly: {month: 7, day: 5, at: "10:00"}\n  timezone: Asia/Shanghai\n')
    _only(project, "summer")
    project.registry(size=20, seed=5)
    clock = SettableClock(datetime(2026, 4, 5, 10, 0, 20, tzinfo=SH))
    rt, sched = _scheduler(project, clock)
    assert sched.tick() == 0  # a quarterly date that is not the yearly one
    clock.set(datetime(2026, 7, 5, 10, 0, 20, tzinfo=SH))
    assert sched.tick() == 1
    clock.set(datetime(2026, 10, 5, 10, 0, 20, tzinfo=SH))
    assert sched.tick() == 0
    (run,) = rt.store.list_runs(campaign_id="summer")
    assert (run.fire_time, run.template_name) == (
        datetime(2026, 7, 5, 10, 0, tzinfo=SH).astimezone(UTC),
        QUARTER_TEMPLATES[3],
    )
