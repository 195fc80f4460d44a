"""A frozen scheduler leader (SIGSTOP) neither blocks its followers nor fires after it lost the lease."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dispatcher.providers.outbox.gateway import read_outbox
from tests.conftest import Project, stop_processes, wait_for

pytestmark = pytest.mark.slow

DRILL = """\
id: drill-interval
title: 反诈演练提醒
owner: 公安分局
channel: sms
template: themes/brushing.sms.j2
variables:
  hotline: "96110"
audience:
  districts: all
schedule:
  interval: 10s
  misfire_grace: 1h
"""


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def test_a_frozen_leader_does_not_block_followers_and_cannot_fire_after_losing_its_lease(
    sqlite_project: Project,
) -> None:
    project = sqlite_project
    project.env.update({"DISPATCH_SCHEDULER_LEASE": "3", "DISPATCH_SCHEDULER_TICK": "0.5"})
    project.registry(size=1500, seed=111)
    for path in (project.root / "campaigns").glob("*.yaml"):
        path.unlink()
    project.write("campaigns/drill.yaml", DRILL)
    logs = [project.root / "var" / f"scheduler-{i}.log" for i in (1, 2)]
    procs = [project.popen("scheduler", stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs]
    try:
        wait_for(lambda: all(any("scheduler.started" in x for x in _lines(log)) for log in logs), 30, "both up")
        wait_for(lambda: any("scheduler.leader" in line for log in logs for line in _lines(log)), 30, "a leader")
        leader_index = next(i for i, log in enumerate(logs) if any("scheduler.leader" in x for x in _lines(log)))
        leader, follower_log = procs[leader_index], logs[1 - leader_index]
        leader_log = logs[leader_index]
        already = sum("scheduler.fir" in x for x in _lines(leader_log))
        # freeze the leader as it fires: inside the transaction that creates the run (or just after it)
        wait_for(lambda: sum("scheduler.fir" in x for x in _lines(leader_log)) > already, 30, "a fire", 0.005)
        os.kill(leader.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        before = len(_lines(follower_log))
        time.sleep(20)
        during = _lines(follower_log)[before:]
        os.kill(leader.pid, signal.SIGCONT)
        print(f"\nfollower logged {len(during)} lines during the {time.monotonic() - frozen_at:.0f}s freeze")
        assert len(during) >= 3, "the follower was blocked by the frozen leader"
        time.sleep(8)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
        stop_processes(procs)
    import sqlalchemy as sa

    from dispatcher.store import schema as t

    store = project.runtime().store
    with store.engine.connect() as conn:
        fires = conn.execute(
            sa.select(t.schedule_fires.c.fire_time, t.schedule_fires.c.scheduler, t.schedule_fires.c.lease_token)
            .where(t.schedule_fires.c.status == "fired")
            .order_by(t.schedule_fires.c.fire_time)
        ).all()
        runs = conn.execute(sa.select(t.runs.c.fire_time, sa.func.count()).group_by(t.runs.c.fire_time)).all()
    assert len(fires) >= 2
    assert all(n == 1 for _, n in runs), "one run per fire time"
    tokens = [f.lease_token for f in fires]
    assert None not in tokens and tokens == sorted(tokens), f"fires out of fencing order: {fires}"
    holder_of = {}
    for f in fires:
        holder_of.setdefault(f.lease_token, f.scheduler)
        assert holder_of[f.lease_token] == f.scheduler, "two schedulers fired under one token"
    for run in store.list_runs(limit=100):
        keys = collections.Counter(x["key"] for x in read_outbox(project.outbox) if x["run_id"] == run.id)
        assert not [k for k, n in keys.items() if n > 1], f"run {run.id} sent someone twice"
    verify = project.dispatch("audit", "verify", "--json", timeout=120)
    print(
        f"fires {len(fires)} (schedulers {sorted({f.scheduler for f in fires})}), runs per fire time "
        f"{sorted(n for _, n in runs)}, lease tokens {tokens}, verify {'ok' if verify.returncode == 0 else 'BROKEN'}"
    )
    assert verify.returncode == 0, verify.stdout[-2000:]
