"""Ledger appends under concurrent workers: rows recorded per second for one run, from 1, 2 and 4 processes.

Each process claims and records whole batches of one run through the store's own ``claim`` and
``record`` (no gateway, no broker), on real PostgreSQL in a fresh schema; the run is made by
``create_run`` as a campaign's would be. With one ledger chain per run every append locks the run's
row, so adding processes adds waiting; with one chain per batch, processes on different batches
append side by side. Figures are printed, not asserted.

    PYTHONPATH=. .venv/bin/python bench/bench_ledger.py                      # this tree
    PYTHONPATH=. .venv/bin/python bench/bench_ledger.py --code /work/main    # another tree, same figures

The workers are this file run again (``worker``) with ``--code`` first on their path, so the same
script measures any tree whose store has ``create_run``/``claim``/``record``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("DISPATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DISTRICTS = ("lucheng", "dingyan", "qishuyan")


def make_run(url: str, batches: int, batch_size: int, run_id: str) -> int:
    """A registry of ``batches * batch_size`` residents and one run over all of them; returns its rows."""
    from dispatcher.store import AudienceFilter, Resident, RunSpec, open_store

    store = open_store(url)
    size = batches * batch_size
    residents = [Resident(f"+86139{i:08d}", f"R{i}", DISTRICTS[i % len(DISTRICTS)], "", ()) for i in range(size)]
    for start in range(0, size, 5000):
        store.upsert_residents(residents[start : start + 5000])
    text = "bench ledger {{ name }}"
    spec = RunSpec(
        run_id=run_id, campaign_id="bench-ledger", title="bench", owner="bench", channel="sms",
        priority="bulk", reason=None, gateway="fake", campaign_path="bench.yaml", campaign_yaml="id: bench",
        campaign_sha256=hashlib.sha256(b"id: bench").hexdigest(), template_name="bench.j2",
        template_text=text, template_sha256=hashlib.sha256(text.encode()).hexdigest(), send_by=None,
        batch_size=batch_size, fire_time=datetime.now(UTC), approval_exempt="benchmark",
    )  # fmt: skip
    created = store.create_run(spec, AudienceFilter(districts=DISTRICTS))
    store.close()
    return created.pending


def work(store: Any, run_id: str, batches: list[int], worker_id: str) -> int:
    """Claim and record each batch as a worker does (every row ``sent``); returns rows recorded."""
    from dispatcher.store import Outcome

    done = 0
    for batch in batches:
        rows = store.claim(run_id, batch, worker_id)
        store.record(
            [
                Outcome(
                    id=r.id,
                    run_id=run_id,
                    state="sent",
                    attempt=r.attempts,
                    gateway="fake",
                    outcome="sent",
                    provider_id=f"bench-{r.id}",
                    parts=1,
                    key=r.key,
                    claim_token=r.claim_token,
                )
                for r in rows
            ],
            actor=worker_id,
        )
        done += len(rows)
        store.finish_if_done(run_id)  # as a worker does after each batch (the last one seals the run)
    return done


def _worker_main(args: argparse.Namespace) -> None:
    from dispatcher.store import open_store

    batches = [int(b) for b in args.batches.split(",") if b]
    store = open_store(args.url, migrate=False)
    store.counts(args.run_id)  # a connection in the pool before the clock starts
    while time.time() < args.start_at:  # every process starts at the same instant
        time.sleep(0.005)
    rows = work(store, args.run_id, batches, args.worker_id)
    print(json.dumps({"rows": rows, "end": time.time()}))
    store.close()


def _fresh_schema() -> tuple[str, str]:
    import sqlalchemy as sa

    schema = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    # the application name lets the lock sampler pick this run's sessions out of pg_stat_activity
    return schema, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}&application_name={schema}"


def _drop_schema(schema: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


class LockSampler:
    """Samples, every 10 ms, how many of the run's sessions wait for a lock (a row lock: another
    transaction's tail). On a machine whose cores are shared, rows/s also measures the neighbours;
    lock waits measure the serialisation itself."""

    def __init__(self, schema: str) -> None:
        import threading

        import sqlalchemy as sa

        self.samples = 0
        self.waiting = 0
        self._stop = threading.Event()
        self._engine = sa.create_engine(POSTGRES_URL)
        self._query = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a AND wait_event_type = 'Lock'"
        )
        self._schema = schema
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self._engine.connect() as conn:
            while not self._stop.is_set():
                self.waiting += int(conn.execute(self._query, {"a": self._schema}).scalar_one())
                self.samples += 1
                conn.rollback()
                time.sleep(0.01)

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._engine.dispose()

    @property
    def mean_waiting(self) -> float:
        return self.waiting / self.samples if self.samples else 0.0


def measure(code: Path, processes: int, batches: int, batch_size: int) -> tuple[float, int, float, str]:
    """One run recorded by ``processes`` workers: (rows/s, rows, mean sessions waiting on a lock, verify)."""
    schema, url = _fresh_schema()
    env = {**os.environ, "PYTHONPATH": str(code)}
    try:
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        setup = subprocess.run(
            [sys.executable, __file__, "setup", "--url", url, "--run-id", run_id,
             "--batches", str(batches), "--batch-size", str(batch_size)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        pending = int(setup.stdout.strip())
        start_at = time.time() + 3.0
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "worker",
                    "--url",
                    url,
                    "--run-id",
                    run_id,
                    "--worker-id",
                    f"w{i}",
                    "--start-at",
                    str(start_at),
                    "--batches",
                    ",".join(str(b) for b in range(i, batches, processes)),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        results = []
        with LockSampler(schema) as locks:
            for proc in procs:
                out, err = proc.communicate(timeout=900)
                if proc.returncode != 0:
                    raise SystemExit(f"worker failed: {err[-2000:]}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        rows = sum(r["rows"] for r in results)
        elapsed = max(r["end"] for r in results) - start_at
        verify = subprocess.run(
            [sys.executable, __file__, "verify", "--url", url, "--run-id", run_id],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert rows == pending, (rows, pending)
        return rows / elapsed, rows, locks.mean_waiting, verify
    finally:
        _drop_schema(schema)


def _verify_main(args: argparse.Namespace) -> None:
    from dispatcher.store import open_store

    store = open_store(args.url, migrate=False)
    events, problem = store.audit.verify_run(args.run_id)
    print(f"{events} events, " + ("intact" if problem is None else f"BROKEN {problem}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    parser.add_argument("--code", type=Path, default=ROOT, help="the source tree to measure (default: this one)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--processes", default="1,2,4")
    setup = sub.add_parser("setup")
    worker = sub.add_parser("worker")
    verify = sub.add_parser("verify")
    for p in (setup, worker, verify):
        p.add_argument("--url", required=True)
        p.add_argument("--run-id", required=True)
    setup.add_argument("--batches", type=int, required=True)
    setup.add_argument("--batch-size", type=int, required=True)
    worker.add_argument("--worker-id", required=True)
    worker.add_argument("--start-at", type=float, required=True)
    worker.add_argument("--batches", required=True)
    args = parser.parse_args()
    if args.cmd == "setup":
        print(make_run(args.url, args.batches, args.batch_size, args.run_id))
        return
    if args.cmd == "worker":
        _worker_main(args)
        return
    if args.cmd == "verify":
        _verify_main(args)
        return
    code = args.code.resolve()
    print(f"code: {code}  run: {args.batches} batches x {args.batch_size} rows, PostgreSQL")
    base = None
    for n in (int(x) for x in args.processes.split(",")):
        rate, rows, waiting, verdict = measure(code, n, args.batches, args.batch_size)
        base = base or rate
        print(
            f"{n} process(es): {rows} rows in {rows / rate:.2f} s = {rate:,.0f} rows/s (x{rate / base:.2f}), "
            f"sessions waiting on a lock: {waiting:.2f} on average; verify: {verdict}"
        )


if __name__ == "__main__":
    main()
