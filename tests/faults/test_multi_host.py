"""Three hosts on a test-made network: a worker host cut off mid-run doubles and loses nobody, and one scheduler leads.

The hosts are Linux network namespaces on one bridge (tests/faults/netns.py): ``data`` runs a
private PostgreSQL, a private Redis and an HTTP carrier (tests/fake_carrier.py); ``w1`` and
``w2`` each run ``dispatch worker`` and ``dispatch scheduler`` as real processes configured
only through the environment a deployment would set. A campaign of a few thousand people is
started; once part of it has gone out, w1's link is cut (its packets dropped, as when a switch
port fails) for longer than the heartbeat, stall and lease timeouts, then restored.

The carrier is reached over the network by both hosts and records every number it takes
before it answers, so its record is the ground truth of what people received; its lookup
by delivery key is how the adapter settles sends whose reply was lost. A scheduled drill
fires every few seconds throughout, so the fences of its fires show which scheduler led when.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Project, _make_project, stop_processes, wait_for
from tests.fake_carrier import CARRIER_CONFIG, LOOKUP_SECTION
from tests.faults.netns import Host, network
from tests.faults.support import PrivateRedis, init_postgres, wait_done

pytestmark = pytest.mark.slow

RECIPIENTS = 3000
TOKEN = "carrier-token-netns-7e1f"
CARRIER_PORT = 8088
#: timeouts a deployment may shorten; the cut lasts well beyond every one of them
TIMEOUTS = {
    "DISPATCH_WORKER_STALE_AFTER": "4",
    "DISPATCH_STALL_AFTER": "4",
    "DISPATCH_WATCHDOG_EVERY": "1",
    "DISPATCH_SCHEDULER_LEASE": "3",
    "DISPATCH_SCHEDULER_TICK": "0.5",
}
CUT_FOR = 15.0

NOTICE = """\
id: network-notice
title: 反诈提醒（多主机）
owner: 公安分局
channel: sms
template: plain.sms.j2
audience:
  districts: all
"""

DRILL = """\
id: network-drill
title: 反诈演练提醒
owner: 公安分局
channel: sms
template: plain.sms.j2
audience:
  districts: [henglin]
  grids: [HL-01]
schedule:
  interval: 6s
  misfire_grace: 1h
"""


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _has(log: Path, event: str) -> bool:
    return any(e.get("event") == event for e in _events(log))


def _carrier_lines(record: Path) -> list[dict[str, str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def _host_project(root: Path, database_url: str, env: dict[str, str]) -> Project:
    """One host's working folder: its own copy of the campaigns, templates and carrier config."""
    project = _make_project(root, database_url)
    for path in (project.root / "campaigns").glob("*.yaml"):
        path.unlink()  # only this test's campaigns: the shipped ones have schedules of their own
    project.write("campaigns/notice.yaml", NOTICE)
    project.write("campaigns/drill.yaml", DRILL)
    project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
    project.write("gateway.yaml", env.pop("_gateway_yaml"))
    project.env.update(env, DISPATCH_HTTP_CONFIG=str(project.root / "gateway.yaml"))
    return project


def _spawn(host: Host, project: Project, name: str, *args: str) -> subprocess.Popen[str]:
    log = (project.root / "var" / f"{name}.log").open("w")
    return subprocess.Popen(
        host.argv(sys.executable, "-m", "dispatcher", *args),
        cwd=project.root,
        env=project.env,
        text=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_a_worker_host_cut_off_mid_run_sends_nobody_twice_loses_nobody_and_one_scheduler_leads(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    with network("data", "w1", "w2") as net:
        data, w1, w2 = net.hosts["data"], net.hosts["w1"], net.hosts["w2"]
        procs: list[subprocess.Popen[str]] = []
        redis = PrivateRedis(port=6379, host=data.address, netns=data.netns)
        pg = None
        try:
            pg = init_postgres(host=data.address, netns=data.netns, port=5432)
            redis.start()
            database_url = pg.new_database()
            record = tmp_path / "carrier.jsonl"
            carrier = subprocess.Popen(
                data.argv(
                    sys.executable, str(Path(__file__).resolve().parent.parent / "fake_carrier.py"),
                    "--host", data.address, "--port", str(CARRIER_PORT), "--record", str(record),
                    "--token", TOKEN, "--delay", "1.0",
                ),
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(carrier)
            assert carrier.stdout is not None and "listening" in carrier.stdout.readline()

            carrier_url = f"http://{data.address}:{CARRIER_PORT}"
            gateway_yaml = CARRIER_CONFIG.format(url=carrier_url, timeout=3, max_size=25) + LOOKUP_SECTION.format(
                url=carrier_url
            )
            shared = {
                "DISPATCH_BROKER_URL": redis.url,
                "DISPATCH_GATEWAY": "http",
                "DISPATCH_HTTP_SECRET_CARRIER_TOKEN": TOKEN,
                "DISPATCH_SEND_WINDOW": "ignore",
                "DISPATCH_FREQUENCY_CAP_MAX": "0",  # the drill reaches the same people every few seconds
                "DISPATCH_BATCH_SIZE": "100",
                **TIMEOUTS,
            }
            operator = _host_project(tmp_path / "operator", database_url, {**shared, "_gateway_yaml": gateway_yaml})
            shared["DISPATCH_BROKER_NAMESPACE"] = operator.env["DISPATCH_BROKER_NAMESPACE"]
            shared["DISPATCH_CLOCK_OFFSET"] = operator.env["DISPATCH_CLOCK_OFFSET"]
            hosts = {
                h.name: _host_project(tmp_path / h.name, database_url, {**shared, "_gateway_yaml": gateway_yaml})
                for h in (w1, w2)
            }
            operator.registry(size=RECIPIENTS, seed=231)
            for campaign in ("campaigns/notice.yaml", "campaigns/drill.yaml"):
                operator.approve(campaign)  # the HTTP carrier is a real gateway: two operators approved these

            logs = {name: p.root / "var" for name, p in hosts.items()}
            # w1's scheduler first, so that the host about to be cut off is the one leading
            procs.append(_spawn(w1, hosts["w1"], "scheduler", "scheduler"))
            wait_for(lambda: _has(logs["w1"] / "scheduler.log", "scheduler.leader"), 60, "w1's scheduler to lead")
            procs.append(_spawn(w2, hosts["w2"], "scheduler", "scheduler"))
            for name, host in (("w1", w1), ("w2", w2)):
                procs.append(_spawn(host, hosts[name], "worker", "worker", "--threads", "2"))
            wait_for(
                lambda: (
                    all(_has(logs[n] / "worker.log", "worker.started") for n in hosts)
                    and _has(logs["w2"] / "scheduler.log", "scheduler.started")
                ),
                60,
                "both workers and the second scheduler",
            )

            run = operator.dispatch("run", "campaigns/notice.yaml", "--no-wait", "--json", timeout=120)
            assert run.returncode == 0, run.stderr
            run_id = str(json.loads(run.stdout)["run_id"])

            def sent_for_run() -> int:
                return sum(1 for line in _carrier_lines(record) if line["run_id"] == run_id)

            w1_worker = next(
                e["worker_id"] for e in _events(logs["w1"] / "worker.log") if e.get("event") == "worker.started"
            )
            watcher = operator.runtime()

            def held_by_w1() -> int:
                return int(watcher.store.sending_holders(run_id).get(w1_worker, 0))

            wait_for(
                lambda: sent_for_run() >= RECIPIENTS // 6 and held_by_w1() > 0,
                120,
                "part of the run to go out, and w1 holding rows in flight",
            )
            w1.cut()
            at_cut, held_at_cut = sent_for_run(), held_by_w1()
            cut_at = time.monotonic()
            try:
                wait_for(
                    lambda: _has(logs["w2"] / "scheduler.log", "scheduler.leader"),
                    CUT_FOR,
                    "w2's scheduler to take the lead while w1 is cut off",
                )
                time.sleep(max(0.0, CUT_FOR - (time.monotonic() - cut_at)))
                during_cut = sent_for_run() - at_cut
            finally:
                w1.restore()
            print(
                f"\ncarrier had {at_cut} of the run at the cut (w1 holding {held_at_cut} rows in flight), "
                f"+{during_cut} during the {CUT_FOR:.0f}s cut"
            )
            assert at_cut < RECIPIENTS, "the run finished before the cut: nothing was tested"
            assert during_cut > 0, "w2 sent nothing while w1 was cut off"

            final = wait_done(operator, run_id, timeout=180)
            unknown = final["counts"].get("unknown", 0)
            if unknown:
                # ambiguous sends (a reply lost in the cut) wait for an operator: `dispatch resume` asks the carrier
                resumed = operator.dispatch("resume", run_id, "--json", timeout=120)
                assert resumed.returncode == 0, resumed.stderr
                final = wait_done(operator, run_id, timeout=120)
            print(f"final counts {final['counts']} (unknown before resume: {unknown})")
            time.sleep(8)  # a few more drill fires with both schedulers on the network again
            stop_processes(procs)
            _check(operator, run_id, record)
            _check_one_leader_at_a_time({name: p.root / "var" / "scheduler.log" for name, p in hosts.items()})
        finally:
            stop_processes(procs)  # whatever failed: no process of the test outlives it or its namespaces
            redis.kill()
            if pg is not None:
                pg.destroy()
    print(f"multi-host test took {time.monotonic() - started:.0f}s")


def _check(operator: Project, run_id: str, record: Path) -> None:
    import sqlalchemy as sa

    from dispatcher import audit
    from dispatcher.store import schema as t

    lines = _carrier_lines(record)
    rt = operator.runtime()
    rows = list(rt.store.deliveries(run_id))
    states = collections.Counter(r.state for r in rows)
    skipped_reasons = collections.Counter(r.reason for r in rows if r.state == "skipped")
    print(f"rows by state {dict(states)}, skipped {dict(skipped_reasons)}")
    taken = collections.Counter(f"{x['run_id']}:{x['to']}" for x in lines if x["run_id"] == run_id)
    twice = [k for k, n in taken.items() if n > 1]
    eligible = {r.key for r in rows if r.state != "skipped"}
    lost = [
        {k: r[k] for k in ("key", "state", "reason", "error_code", "attempts")}
        for r in rows
        if r.key in eligible and (r.state not in ("sent", "delivered") or r.key not in taken)
    ]
    assert not twice, f"{len(twice)} people sent twice at the carrier, e.g. {twice[:3]}"
    assert not lost, f"{len(lost)} people not sent exactly once, e.g. {lost[:3]}"
    assert set(taken) == eligible, f"the carrier took numbers the log never sent: {sorted(set(taken) - eligible)[:3]}"
    by_key = {f"{x['run_id']}:{x['to']}": x["msgid"] for x in lines}
    assert all(r.provider_id == by_key[r.key] for r in rows if r.key in eligible), "a row holds another message's id"

    # every state change of the run's deliveries as auditors read it (a batch's results expanded per row)
    changes = list(rt.store.audit.events(audit.LogFilter.parse(run=run_id)))
    to_sent = collections.Counter(c["key"] for c in changes if c["to_state"] == "sent")
    with rt.store.engine.connect() as conn:
        e = t.events
        fires = conn.execute(
            sa.select(t.schedule_fires.c.fire_time, t.schedule_fires.c.scheduler, t.schedule_fires.c.lease_token)
            .where(t.schedule_fires.c.status == "fired")
            .order_by(t.schedule_fires.c.fire_time)
        ).all()
        runs_per_fire = conn.execute(
            sa.select(t.runs.c.fire_time, sa.func.count())
            .where(t.runs.c.fire_time.is_not(None))
            .group_by(t.runs.c.fire_time)
        ).all()
        late = conn.execute(
            sa.select(e.c.from_state, e.c.to_state, e.c.reason).where(e.c.run_id == run_id, e.c.kind == "delivery.late")
        ).all()
    moves = collections.Counter(
        f"{a}->{b} {why or ''}".strip()
        for a, b, why in [*((c["from_state"], c["to_state"], c["reason"]) for c in changes), *late]
    )
    print(f"ledger moves of the run: {dict(moves)}")
    assert set(to_sent) == eligible and set(to_sent.values()) == {1}, "the ledger must move each person to sent once"

    # one leader at a time: one run per fire time, fences increasing with the fire times, one scheduler per fence
    assert len(fires) >= 3, f"the drill fired only {len(fires)} times"
    assert all(n == 1 for _, n in runs_per_fire), f"two runs for one fire time: {runs_per_fire}"
    tokens = [f.lease_token for f in fires]
    assert None not in tokens and tokens == sorted(tokens), f"fires out of fencing order: {fires}"
    holder_of: dict[int, str] = {}
    for f in fires:
        assert holder_of.setdefault(f.lease_token, f.scheduler) == f.scheduler, "two schedulers fired under one fence"
    assert len({f.scheduler for f in fires}) >= 2, "the lead never moved from the cut-off host"
    drill_twice = [k for k, n in collections.Counter(f"{x['run_id']}:{x['to']}" for x in lines).items() if n > 1]
    assert not drill_twice, f"a drill run sent someone twice: {drill_twice[:3]}"

    verify = operator.dispatch("audit", "verify", "--json", timeout=120)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    print(
        f"run {run_id}: {len(eligible)} eligible, {len(taken)} at the carrier once each; "
        f"drill fires {len(fires)} by {[f.scheduler.split(':')[0] for f in fires]}, fences {tokens}"
    )


#: what only the leading scheduler does, as its log says
LEADER_ACTIONS = ("scheduler.fired", "run.reconciled", "watchdog.requeued")


def _check_one_leader_at_a_time(logs: dict[str, Path]) -> None:
    """No scheduler acts as leader after another one took a newer fence (the lead passed while it was busy)."""
    fenced = [
        (e["timestamp"], name, int(e["fence"]))
        for name, log in logs.items()
        for e in _events(log)
        if e.get("event") == "scheduler.fenced"
    ]
    overlaps = []
    for name, log in logs.items():
        for e in _events(log):
            if e.get("event") not in LEADER_ACTIONS:
                continue
            at = e["timestamp"]
            own = max((f for t, n, f in fenced if n == name and t <= at), default=0)
            newer = [(t, n, f) for t, n, f in fenced if n != name and f > own and t < at]
            if newer:
                took, other, fence = newer[0]
                overlaps.append(f"{name} {e['event']} at {at} under fence {own}, {other} took fence {fence} at {took}")
    assert not overlaps, f"two schedulers acted as leader at once: {overlaps[:3]}"
