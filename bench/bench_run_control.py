#!/usr/bin/env python3
"""Run control: how fast `dispatch pause` stops real workers, and whether resume sends everyone once.

Starts ``--workers`` `dispatch worker` processes paced at ``--rate`` msg/s, pauses the run
once ``--after`` messages went out, and prints the seconds from the pause command to the
last message handed over (target: within 2 s). Then resumes and prints duplicates and
missing recipients (target: 0 and 0). Needs PostgreSQL and Redis (see bench/_harness.py).

    .venv/bin/python bench/bench_run_control.py [--workers 3] [--rate 200] [--size 3000]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchProject, wait_for

from dispatcher.providers.outbox.gateway import read_outbox


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--after", type=int, default=500)
    args = parser.parse_args()
    project = BenchProject(DISPATCH_RATE_LIMIT=str(args.rate), DISPATCH_BATCH_SIZE="100")
    try:
        project.registry(args.size, seed=60)
        for i in range(args.workers):
            project.popen("worker", "--threads", "4", log=f"worker-{i}.log")
        for i in range(args.workers):
            project.wait_log(f"worker-{i}.log", "worker.started")
        run = json.loads(project.dispatch("run", "campaigns/quarterly-themes.yaml", "--no-wait", "--json").stdout)
        run_id = run["run_id"]

        def lines() -> list[dict]:  # type: ignore[type-arg]
            return [line for line in read_outbox(project.outbox) if line["run_id"] == run_id]

        wait_for(lambda: len(lines()) >= args.after, 120, f"{args.after} sends")
        paused_at = time.time()
        project.dispatch("pause", run_id)
        time.sleep(4)
        stamps = [datetime.fromisoformat(line["at"]).timestamp() for line in lines()]
        last = max(stamps)
        after_pause = sum(1 for t in stamps if t > paused_at)
        status = json.loads(project.dispatch("status", run_id, "--json").stdout)
        project.dispatch("resume", run_id, "--no-wait")
        wait_for(
            lambda: json.loads(project.dispatch("status", run_id, "--json").stdout)["status"] == "completed",
            300,
            "the resumed run",
            every=0.5,
        )
        rows = [r for r in json.loads(project.dispatch("status", run_id, "--json").stdout)["by_district"].values()]
        keys = collections.Counter(line["key"] for line in lines())
        eligible = run["total"] - run["counts"].get("skipped", 0)
    finally:
        project.close()
    print(f"workers={args.workers} rate={args.rate:g}/s recipients={run['total']} eligible={eligible}")
    print(f"paused after {len(stamps) - after_pause} sent; {after_pause} more handed over after the command")
    print(f"last message {last - paused_at:.3f}s after `dispatch pause` was started (target <= 2 s)")
    print(f"while paused: pending {status['counts'].get('pending', 0)}, sending {status['counts'].get('sending', 0)}")
    dupes = sum(1 for n in keys.values() if n > 1)
    print(
        f"after resume: sent {len(keys)} distinct of {eligible} eligible, duplicates {dupes}, "
        f"missing {eligible - len(keys)}; districts {len(rows)}"
    )
    print("PASS" if last - paused_at <= 2.0 and dupes == 0 and len(keys) == eligible else "FAIL")


if __name__ == "__main__":
    main()
