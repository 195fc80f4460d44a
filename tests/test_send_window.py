"""Send windows, urgent campaigns and the frequency cap, with a clock the test sets.

In-process on the embedded broker and SQLite: the behaviour is about the clock, not
about processes, so a real worker thread and a ``SettableClock`` replace any sleeping
through real nights and weeks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pytest

from dispatcher.campaigns import SendWindow, load_campaign
from dispatcher.clock import SettableClock
from dispatcher.errors import ConfigError
from dispatcher.providers.outbox.gateway import read_outbox
from dispatcher.runs import start_run
from dispatcher.runtime import Runtime
from dispatcher.send_window import is_open, next_opening
from dispatcher.settings import Settings
from dispatcher.workers import start_worker, stop_worker

if TYPE_CHECKING:
    from tests.conftest import Project

SH = ZoneInfo("Asia/Shanghai")
CAMPAIGN = "campaigns/refund-scam-lucheng.yaml"


from tests.conftest import wait_for  # noqa: E402 - shared helper

_wait = wait_for


@contextmanager
def _worker(rt: Runtime) -> Iterator[None]:
    worker, heartbeat = start_worker(rt)
    try:
        yield
    finally:
        stop_worker(rt, worker, heartbeat)


def _runtime(project: Project, clock: SettableClock) -> Runtime:
    project.env["DISPATCH_SEND_WINDOW"] = "enforce"
    # a deferred batch looks at the (test) clock again after at most 0.2 s instead of sleeping till 08:00
    project.env["DISPATCH_WINDOW_RECHECK"] = "0.2"
    return project.runtime(clock=clock)


def _load(project: Project, relative: str):  # type: ignore[no-untyped-def]
    return load_campaign(project.root / relative, project.root / "templates")


def _sent(project: Project, run_id: str) -> list[dict]:  # type: ignore[type-arg]
    return [line for line in read_outbox(project.outbox) if line["run_id"] == run_id]


def test_window_opens_at_start_closes_at_end_and_may_span_midnight() -> None:
    day = SendWindow()
    assert not is_open(day, SH, datetime(2023, 4, 3, 7, 59, tzinfo=SH))
    assert is_open(day, SH, datetime(2023, 4, 3, 8, 0, tzinfo=SH))
    assert is_open(day, SH, datetime(2023, 4, 3, 20, 59, tzinfo=SH))
    assert not is_open(day, SH, datetime(2023, 4, 3, 21, 0, tzinfo=SH))
    eight = datetime(2023, 4, 4, 8, 0, tzinfo=SH)
    assert next_opening(day, SH, datetime(2023, 4, 3, 22, 0, tzinfo=SH)) == eight
    assert next_opening(day, SH, datetime(2023, 4, 4, 6, 0, tzinfo=SH)) == eight
    night = SendWindow(start="22:00", end="06:00")
    assert is_open(night, SH, datetime(2023, 4, 3, 23, 30, tzinfo=SH))
    assert is_open(night, SH, datetime(2023, 4, 4, 5, 59, tzinfo=SH))
    assert not is_open(night, SH, datetime(2023, 4, 4, 12, 0, tzinfo=SH))
    # the window is read in Shanghai time whatever zone the clock reports in
    assert not is_open(day, SH, datetime(2023, 4, 3, 14, 0, tzinfo=ZoneInfo("UTC")))  # 22:00 in Shanghai


def test_bulk_run_at_22h_sends_nothing_until_08h_then_everything(project: Project) -> None:
    project.registry(size=300, seed=3)
    clock = SettableClock(datetime(2023, 4, 3, 22, 0, tzinfo=SH))
    rt = _runtime(project, clock)
    created = start_run(rt, _load(project, CAMPAIGN))
    assert created.pending > 0
    with _worker(rt):
        time.sleep(1.5)  # the batch reaches the worker, is deferred, and comes back several times
        assert _sent(project, created.run_id) == []
        assert rt.store.counts(created.run_id).get("pending") == created.pending
        clock.set(datetime(2023, 4, 4, 7, 59, 58, tzinfo=SH))
        _wait(lambda: len(_sent(project, created.run_id)) == created.pending, 15, "the 08:00 opening")
    first_sent = min(r.sent_at for r in rt.store.deliveries(created.run_id) if r.sent_at)
    assert first_sent.replace(tzinfo=ZoneInfo("UTC")) >= datetime(2023, 4, 4, 8, 0, tzinfo=SH)
    skipped = created.total - created.pending
    expected = {"sent": created.pending, **({"skipped": skipped} if skipped else {})}
    assert rt.store.counts(created.run_id) == expected


def test_urgent_campaign_with_a_reason_sends_at_22h_and_records_the_reason(project: Project) -> None:
    project.registry(size=200, seed=4)
    text = (project.root / CAMPAIGN).read_text(encoding="utf-8")
    project.write(
        "campaigns/urgent-refund.yaml",
        text.replace("id: refund-scam-lucheng", "id: urgent-refund")
        + "priority: urgent\nreason: 预警中心发现针对本区的冒充客服退款诈骗正在进行\n",
    )
    clock = SettableClock(datetime(2023, 4, 3, 22, 0, tzinfo=SH))
    rt = _runtime(project, clock)
    with _worker(rt):
        created = start_run(rt, _load(project, "campaigns/urgent-refund.yaml"))
        _wait(lambda: len(_sent(project, created.run_id)) == created.pending, 15, "the urgent run")
    run = rt.store.get_run(created.run_id)
    assert run.priority == "urgent" and run.reason.startswith("预警中心")


def test_frequency_cap_skips_the_third_bulk_message_of_the_week_with_its_reason(any_db_project: Project) -> None:
    project = any_db_project  # the cap's query differs on PostgreSQL (one array parameter)
    project.registry(size=150, seed=6)
    clock = SettableClock(datetime(2023, 4, 3, 10, 0, tzinfo=SH))
    rt = _runtime(project, clock)
    loaded = _load(project, CAMPAIGN)
    runs = []
    with _worker(rt):
        for day in (0, 2, 4, 9):  # Monday, Wednesday, Friday, and the Wednesday after
            clock.set(datetime(2023, 4, 3, 10, 0, tzinfo=SH) + timedelta(days=day))
            created = start_run(rt, loaded)
            _wait(lambda c=created: rt.store.finish_if_done(c.run_id), 15, f"run of day {day}")
            runs.append(created)
    counts = [rt.store.counts(c.run_id) for c in runs]
    eligible = runs[0].pending
    assert counts[0]["sent"] == counts[1]["sent"] == eligible
    assert counts[2].get("sent", 0) == 0
    third = list(rt.store.deliveries(runs[2].run_id))
    capped = [r for r in third if r.reason == "frequency_cap"]
    assert len(capped) == eligible and all(r.state == "skipped" for r in capped)
    assert len(_sent(project, runs[2].run_id)) == 0
    # nine days after the first, only one message is inside the rolling week: the cap allows another
    assert counts[3]["sent"] == eligible
    verify = project.dispatch("audit", "verify")  # the skips are in the ledger like any state change
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_campaign_frequency_cap_overrides_the_default(any_db_project: Project) -> None:
    project = any_db_project  # the cap's query differs on PostgreSQL (one array parameter)
    project.registry(size=80, seed=7)
    text = (project.root / CAMPAIGN).read_text(encoding="utf-8")
    once = text.replace("id: refund-scam-lucheng", "id: once-a-day") + "frequency_cap: {max: 1, per: 1d}\n"
    project.write("campaigns/once-a-day.yaml", once)
    clock = SettableClock(datetime(2023, 4, 3, 10, 0, tzinfo=SH))
    rt = _runtime(project, clock)
    loaded = _load(project, "campaigns/once-a-day.yaml")
    with _worker(rt):
        first = start_run(rt, loaded)
        _wait(lambda: rt.store.finish_if_done(first.run_id), 15, "first run")
        clock.set(datetime(2023, 4, 3, 18, 0, tzinfo=SH))
        second = start_run(rt, loaded)
        _wait(lambda: rt.store.finish_if_done(second.run_id), 15, "second run")
    assert rt.store.counts(first.run_id)["sent"] == first.pending
    second_rows = [r for r in rt.store.deliveries(second.run_id) if r.reason != "opted_out"]
    assert len(second_rows) == second.pending > 0
    assert {(r.state, r.reason) for r in second_rows} == {("skipped", "frequency_cap")}


def test_bad_window_and_clock_settings_are_one_line_errors(project: Project) -> None:
    with pytest.raises(ConfigError, match="DISPATCH_SEND_WINDOW"):
        Settings.from_env({"DISPATCH_SEND_WINDOW": "sometimes"})
    with pytest.raises(ConfigError, match="DISPATCH_FAKE_NOW"):
        Settings.from_env({"DISPATCH_FAKE_NOW": "22:00"})
    text = (project.root / CAMPAIGN).read_text(encoding="utf-8")
    project.write("campaigns/bad.yaml", text + "send_window: {start: '8am', end: '21:00'}\n")
    result = project.dispatch("validate", "campaigns/bad.yaml")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("campaigns/bad.yaml:") and "send_window" in line and "HH:MM" in line, line


def test_two_bulk_runs_sending_to_the_same_people_at_once_never_exceed_the_cap(any_db_project: Project) -> None:
    """Run A has claimed a batch (its messages in flight) when run B checks the cap for the same people."""
    project = any_db_project  # the cap's query differs on PostgreSQL (one array parameter)
    from dispatcher.sender import process_batch

    project.registry(size=30, seed=8)
    text = (project.root / CAMPAIGN).read_text(encoding="utf-8")
    project.write(
        "campaigns/once.yaml",
        text.replace("id: refund-scam-lucheng", "id: once") + "frequency_cap: {max: 1, per: 7d}\n",
    )
    clock = SettableClock(datetime(2023, 4, 3, 10, 0, tzinfo=SH))
    rt = _runtime(project, clock)
    loaded = _load(project, "campaigns/once.yaml")
    from dispatcher.runs import audience_filter, run_spec

    run_a = run_spec(rt, loaded)
    rt.store.create_run(run_a, audience_filter(loaded))
    in_flight = rt.store.claim(run_a.run_id, 0, "worker-a")  # A is mid-send: claimed, not yet recorded
    assert in_flight
    clock.set(datetime(2023, 4, 3, 10, 0, 1, tzinfo=SH))
    run_b = run_spec(rt, loaded)
    rt.store.create_run(run_b, audience_filter(loaded))
    process_batch(rt, run_b.run_id, 0)
    b_rows = {r.phone: r for r in rt.store.deliveries(run_b.run_id)}
    for row in in_flight:
        assert (b_rows[row.phone].state, b_rows[row.phone].reason) == ("skipped", "frequency_cap")
    assert not any(line["run_id"] == run_b.run_id for line in _outbox_lines(project))


def _outbox_lines(project: Project) -> list[dict]:  # type: ignore[type-arg]
    from dispatcher.providers.outbox.gateway import read_outbox

    return list(read_outbox(project.outbox))
