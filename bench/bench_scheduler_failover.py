#!/usr/bin/env python3
"""Scheduler failover: three `dispatch scheduler` processes, one campaign firing every 5 s.

Kills the leader (SIGKILL, no goodbye) after ``--kill-after`` seconds and prints: runs per
fire time (target: exactly 1), fire times lost between the first and the last (target: 0),
the seconds from the kill to the next leader (target: within the lease), and how late the
fires due during the handover were made up. Needs PostgreSQL and Redis.

    .venv/bin/python bench/bench_scheduler_failover.py [--seconds 30] [--lease 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchProject

SCHEDULE = "schedule:\n  interval: 5s\n  misfire_grace: 1h\n"


def _events(path: Path, name: str) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for raw in path.read_text().splitlines():
        try:
            item = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if item.get("event") == name:
            out.append(item)
    return out


def _ts(item: dict) -> float:  # type: ignore[type-arg]
    return datetime.fromisoformat(item["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--kill-after", type=float, default=12.0)
    parser.add_argument("--lease", type=float, default=3.0)
    args = parser.parse_args()
    project = BenchProject(DISPATCH_SCHEDULER_LEASE=str(args.lease), DISPATCH_SCHEDULER_TICK="0.25")
    try:
        text = (project.root / "campaigns/quarterly-themes.yaml").read_text(encoding="utf-8")
        for path in (project.root / "campaigns").glob("*.yaml"):
            path.unlink()
        drill = text.split("schedule:")[0].replace("id: quarterly-themes", "id: drill") + SCHEDULE
        (project.root / "campaigns/drill.yaml").write_text(drill, encoding="utf-8")
        project.registry(50, seed=70)
        procs = [project.popen("scheduler", log=f"scheduler-{i}.log") for i in range(3)]
        logs = [project.root / "var" / f"scheduler-{i}.log" for i in range(3)]
        time.sleep(args.kill_after)
        leaders = [i for i in range(3) if _events(logs[i], "scheduler.leader")]
        leader = leaders[0]
        procs[leader].send_signal(signal.SIGKILL)
        killed_at = time.time()
        time.sleep(args.seconds - args.kill_after)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        runs = json.loads(project.dispatch("runs", "--campaign", "drill", "--limit", "1000", "--json").stdout)["runs"]
        takeovers = [_ts(e) for i in range(3) if i != leader for e in _events(logs[i], "scheduler.leader")]
        fired = [e for i in range(3) for e in _events(logs[i], "scheduler.fired")]
    finally:
        project.close()
    per_time = collections.Counter(r["fire_time"] for r in runs)
    times = sorted(datetime.fromisoformat(t) for t in per_time)
    expected = int((times[-1] - times[0]).total_seconds() // 5) + 1
    handover = min(t for t in takeovers if t > killed_at) - killed_at
    late = [e["late_s"] for e in fired]
    print(f"3 schedulers, interval 5 s, {args.seconds:g} s, leader (process {leader}) killed at {args.kill_after:g} s")
    print(f"runs: {len(runs)} for {len(per_time)} fire times; max runs per fire time {max(per_time.values())}")
    print(f"fire times from first to last: {len(times)} of {expected} expected -> lost {expected - len(times)}")
    print(f"handover: new leader {handover:.2f}s after the kill (lease {args.lease:g} s)")
    print(f"fire lateness: median {sorted(late)[len(late) // 2]:.3f}s, max {max(late):.3f}s (made-up fires included)")
    ok = max(per_time.values()) == 1 and expected == len(times) and handover <= args.lease + 1
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
