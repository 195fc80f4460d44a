#!/usr/bin/env python3
"""Urgent lane: how soon an urgent run starts sending behind a large bulk backlog.

Creates a bulk run of ``--bulk`` recipients (100,000 by default) on real `dispatch worker`
processes, waits until they are busy with it, then enqueues an urgent run (one grid) and
prints the seconds from its enqueue to its first message in the outbox, and to its last.
``--urgent-threads 0`` shows the same workers without threads kept for urgent work.
Needs PostgreSQL and Redis (see bench/_harness.py).

    .venv/bin/python bench/bench_lanes.py [--bulk 100000] [--workers 2] [--rate 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchProject, wait_for

from dispatcher.providers.outbox.gateway import read_outbox

URGENT = """
priority: urgent
reason: 预警中心：本网格正发生冒充公检法诈骗，请立即提醒居民
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--urgent-threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=1000.0, help="gateway rate shared by all (0 = unlimited)")
    args = parser.parse_args()
    project = BenchProject(DISPATCH_RATE_LIMIT=str(args.rate), DISPATCH_URGENT_THREADS=str(args.urgent_threads))
    try:
        text = (project.root / "campaigns/refund-scam-lucheng.yaml").read_text(encoding="utf-8")
        urgent_yaml = text.replace("id: refund-scam-lucheng", "id: urgent-alert")
        urgent_yaml = urgent_yaml.replace("  districts: [lucheng, dingyan]", "  districts: [dingyan]\n  grids: [DY-01]")
        (project.root / "campaigns/urgent-alert.yaml").write_text(urgent_yaml + URGENT, encoding="utf-8")
        t0 = time.perf_counter()
        project.registry(args.bulk, seed=100)
        print(f"registry of {args.bulk} imported in {time.perf_counter() - t0:.1f}s")
        for i in range(args.workers):
            project.popen("worker", "--threads", str(args.threads), log=f"worker-{i}.log")
        for i in range(args.workers):
            project.wait_log(f"worker-{i}.log", "worker.started")
        bulk = json.loads(project.dispatch("run", "campaigns/quarterly-themes.yaml", "--no-wait", "--json").stdout)
        print(f"bulk run: {bulk['total']} recipients in {bulk['batches']} batches enqueued")
        wait_for(lambda: project.outbox.exists() and project.outbox.stat().st_size > 100_000, 120, "bulk sending")
        urgent = json.loads(project.dispatch("run", "campaigns/urgent-alert.yaml", "--no-wait", "--json").stdout)
        enqueued = float(urgent["enqueued_at"])

        def urgent_lines() -> list[float]:
            return sorted(
                datetime.fromisoformat(line["at"]).timestamp()
                for line in read_outbox(project.outbox)
                if line["run_id"] == urgent["run_id"]
            )

        wait_for(lambda: len(urgent_lines()) >= 1, 120, "the first urgent message", every=0.02)
        wait_for(lambda: len(urgent_lines()) >= urgent["total"] - 50, 120, "the urgent run", every=0.1)
        time.sleep(0.5)  # the last few urgent messages
        stamps = urgent_lines()
        bulk_sent = sum(1 for line in read_outbox(project.outbox) if line["run_id"] == bulk["run_id"])
        project.dispatch("cancel", bulk["run_id"])
    finally:
        project.close()
    print(f"workers={args.workers} threads={args.threads} urgent_threads={args.urgent_threads} rate={args.rate:g}/s")
    print(
        f"bulk backlog when the urgent run was enqueued: at least {bulk['total'] - bulk_sent} of {bulk['total']} unsent"
    )
    print(
        f"urgent run: {len(stamps)} messages; first sent {stamps[0] - enqueued:.3f}s after enqueue, "
        f"last {stamps[-1] - enqueued:.3f}s"
    )
    print("PASS" if stamps[0] - enqueued <= 1.0 else "FAIL")


if __name__ == "__main__":
    main()
