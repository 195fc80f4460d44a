#!/usr/bin/env python3
"""Global rate limit: N `dispatch worker` processes share one Redis-paced gateway rate.

Prints the achieved rate over the measuring window (as % of the limit) and the most
messages in any one-second window (sliding, from the outbox's own timestamps), which
must not exceed limit + 1. Needs PostgreSQL and Redis (see bench/_harness.py).

    .venv/bin/python bench/bench_rate_limit.py [--rate 50] [--workers 3] [--seconds 20]
"""

from __future__ import annotations

import argparse
import bisect
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
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    needed = int(args.rate * (args.seconds + 5))
    project = BenchProject(DISPATCH_RATE_LIMIT=str(args.rate), DISPATCH_BATCH_SIZE="50")
    try:
        project.registry(int(needed * 1.15) + 100, seed=50)
        for i in range(args.workers):
            project.popen("worker", "--threads", str(args.threads), log=f"worker-{i}.log")
        for i in range(args.workers):
            project.wait_log(f"worker-{i}.log", "worker.started")
        run = json.loads(project.dispatch("run", "campaigns/quarterly-themes.yaml", "--no-wait", "--json").stdout)
        wait_for(lambda: project.outbox.exists() and project.outbox.stat().st_size > 0, 30, "the first send")
        time.sleep(args.seconds + 1.5)
        project.dispatch("cancel", run["run_id"])
        stamps = sorted(datetime.fromisoformat(line["at"]).timestamp() for line in read_outbox(project.outbox))
    finally:
        project.close()
    start = stamps[0]
    window = [t for t in stamps if t < start + args.seconds]
    achieved = len(window) / args.seconds
    worst = max(bisect.bisect_left(stamps, t + 1.0) - i for i, t in enumerate(stamps))
    per_second = [sum(1 for t in window if start + s <= t < start + s + 1) for s in range(int(args.seconds))]
    print(f"workers={args.workers} threads/worker={args.threads} limit={args.rate:g} msg/s window={args.seconds:g}s")
    print(f"sent in window: {len(window)} -> {achieved:.2f} msg/s = {100 * achieved / args.rate:.1f}% of the limit")
    print(f"max in any sliding 1 s window: {worst} (limit + 1 = {args.rate + 1:g})")
    print(f"per whole second: min {min(per_second)} max {max(per_second)}")
    ok = 0.95 * args.rate <= achieved <= args.rate * 1.0 + 1 / args.seconds and worst <= args.rate + 1
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
