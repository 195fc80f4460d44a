#!/usr/bin/env python3
"""Early warning under load: how soon an alert's SMS and call go out while the workers are busy with bulk work.

Creates a bulk run of ``--bulk`` recipients (100,000 by default) on ``--workers`` real `dispatch worker`
processes, waits until they are busy with it, starts a `dispatch scheduler` (the leader fires the later
steps), then takes ``--alerts`` alerts one after another with `dispatch alert send` (residents of the
registry, their grids on the roster). Prints, per alert, the seconds from the command returning to the
SMS handed to the gateway (its attempt time) and to the first call placed, and for the escalation step
(``notify_grid``, due ``--escalate-after`` seconds after the alert) how late its leader fired it.
Needs PostgreSQL and Redis (see bench/_harness.py).

    .venv/bin/python bench/bench_alerts.py [--bulk 100000] [--workers 2] [--alerts 50] [--rate 1000]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchProject, wait_for

from dispatcher.runtime import Runtime
from dispatcher.settings import Settings


def _pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _line(label: str, values: list[float], limit: float | None) -> str:
    if not values:
        return f"{label}: no samples"
    verdict = "" if limit is None else ("  PASS" if _pct(values, 99) < limit else "  FAIL")
    return (
        f"{label}: n={len(values)} p50={_pct(values, 50):.3f}s p99={_pct(values, 99):.3f}s "
        f"max={max(values):.3f}s{verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0, help="gateway rate shared by all (0 = unlimited)")
    parser.add_argument("--escalate-after", type=int, default=20, help="seconds to the notify_grid step")
    args = parser.parse_args()
    project = BenchProject(DISPATCH_RATE_LIMIT=str(args.rate), DISPATCH_SCHEDULER_TICK="0.5")
    (project.root / "alerting.yaml").write_text(
        "steps:\n  - {after: 0s, action: sms}\n  - {after: 0s, action: call}\n"
        f"  - {{after: {args.escalate_after}s, action: notify_grid}}\n",
        encoding="utf-8",
    )
    empty = project.root / "var" / "no-campaigns"
    empty.mkdir()
    sent_back: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        project.registry(args.bulk, seed=100)
        print(f"registry of {args.bulk} imported in {time.perf_counter() - t0:.1f}s")
        with (project.root / "var" / "residents.csv").open(encoding="utf-8") as fh:
            residents = [row for _, row in zip(range(args.alerts), csv.DictReader(fh), strict=False)]
        roster = project.root / "var" / "roster.csv"
        grids = sorted({r["grid"] for r in residents})
        roster.write_text(
            "grid,role,name,phone\n" + "".join(f"{g},police_duty,值班,1390000{i:04d}\n" for i, g in enumerate(grids)),
            encoding="utf-8",
        )
        project.dispatch("roster", "import", str(roster))
        for i in range(args.workers):
            project.popen("worker", "--threads", str(args.threads), log=f"worker-{i}.log")
        for i in range(args.workers):
            project.wait_log(f"worker-{i}.log", "worker.started")
        project.popen("scheduler", "--campaigns", str(empty), log="scheduler.log")
        project.wait_log("scheduler.log", "scheduler.leader")
        bulk = json.loads(project.dispatch("run", "campaigns/quarterly-themes.yaml", "--no-wait", "--json").stdout)
        print(f"bulk run: {bulk['total']} recipients in {bulk['batches']} batches enqueued")
        wait_for(lambda: project.outbox.exists() and project.outbox.stat().st_size > 100_000, 120, "bulk sending")
        for i, r in enumerate(residents):
            out = project.dispatch(
                "alert", "send", "--phone", r["phone"], "--type", "brushing", "--id", f"B{i}", "--json"
            )
            sent_back[json.loads(out.stdout)["id"]] = time.time()
        time.sleep(args.escalate_after + 3)
        rt = Runtime(Settings.from_env(project.env))
        sms, call, late = [], [], []
        skipped_calls = 0
        for alert_id, returned in sent_back.items():
            for step in rt.store.alerts.steps(alert_id):
                if step.state == "skipped":
                    skipped_calls += step.action == "call"
                    continue
                if step.action == "notify_grid" and step.fired_at is not None:
                    late.append((step.fired_at - step.due_at).total_seconds())
                if step.run_id is None or step.action == "notify_grid":
                    continue
                rows = list(rt.store.deliveries(step.run_id))
                tries = rt.store.attempts_for(rows[0].id) if rows else []
                if tries:
                    (sms if step.action == "sms" else call).append(tries[0].at.timestamp() - returned)
        bulk_sent = rt.store.counts(bulk["run_id"])
        rt.close()
        project.dispatch("cancel", bulk["run_id"])
    finally:
        project.close()
    print(f"workers={args.workers} threads={args.threads} rate={args.rate:g}/s alerts={len(sent_back)}")
    print(f"bulk run while alerts were taken: {bulk_sent}")
    print(_line("command returned -> SMS handed to the gateway", sms, 1.0))
    print(_line("command returned -> first call placed", call, 2.0) + (f" ({skipped_calls} call steps skipped)"))
    print(_line("escalation step fired after its due time", late, 1.0))


if __name__ == "__main__":
    main()
