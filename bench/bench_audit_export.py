#!/usr/bin/env python3
"""Export a 1,000,000-event ledger to CSV with `dispatch audit log` and print the time and peak RSS.

Builds (once, then reuses) a delivery log with N residents and one run whose rows all
went pending -> sending -> sent through the store's real claim/record path, as a worker
records them: per batch of 5,000 a claim event and a results event naming its rows, so
the export lists N delivery state changes. Then runs the real command in a subprocess,
writing the CSV to a file, and reads the child's peak RSS from getrusage. Also times
`dispatch audit verify` over the same ledger.

Usage:
    .venv/bin/python bench/bench_audit_export.py        # SQLite, 1,000,000 residents -> 1,000,000 rows
    .venv/bin/python bench/bench_audit_export.py --residents 50000
    .venv/bin/python bench/bench_audit_export.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher import domain  # noqa: E402
from dispatcher.store import SENT, AudienceFilter, Outcome, Resident, RunSpec, iter_chunks, open_store  # noqa: E402


def residents(n: int):
    for i in range(n):
        d = domain.DISTRICTS[i % len(domain.DISTRICTS)]
        yield Resident(
            phone=f"+86139{i:08d}",
            name=f"居民{i}",
            district=d.id,
            grid=f"{d.grid_prefix}-{i % 12 + 1:02d}",
            segments=(domain.SEGMENTS[i % len(domain.SEGMENTS)].id,),
        )


def build(url: str, n: int, batch: int) -> None:
    store = open_store(url)
    t0 = time.perf_counter()
    for chunk in iter_chunks(residents(n), 5000):
        store.upsert_residents(chunk)
    text = "bench"
    import hashlib

    sha = hashlib.sha256(text.encode()).hexdigest()
    spec = RunSpec(
        run_id="20210215-020000-bench0", campaign_id="bench", title="bench", owner="police", channel="sms",
        priority="bulk", reason=None, gateway="outbox", campaign_path="bench.yaml", campaign_yaml=text,
        campaign_sha256=sha, template_name="bench.sms.j2", template_text=text, template_sha256=sha,
        send_by=None, batch_size=batch,
    )  # fmt: skip
    created = store.create_run(spec, AudienceFilter(districts=tuple(d.id for d in domain.DISTRICTS)))
    for b in range(created.batches):
        claimed = store.claim(spec.run_id, b, "bench-worker")
        store.record(
            [
                Outcome(
                    id=c.id,
                    run_id=c.run_id,
                    key=c.key,
                    batch=c.batch,
                    claim_token=c.claim_token,
                    state=SENT,
                    attempt=1,
                    gateway="outbox",
                    outcome="sent",
                    provider_id=f"bench:{c.id}",
                    parts=1,
                    encoding="UCS-2",
                    body="【常州经开区】谨防诈骗",
                )
                for c in claimed
            ]
        )
    if not store.is_sqlite:
        # what autovacuum does shortly after a bulk load in production; without it the planner
        # guesses from empty-table statistics
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    store.close()
    print(f"built {n} residents and their run in {time.perf_counter() - t0:.1f}s", flush=True)


def timed(args: list[str], env: dict[str, str], stdout: object) -> tuple[float, int]:
    """Wall time and peak RSS (kB) of one `dispatch` subprocess (os.wait4 gives that child's own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher", *args], env=env, stdout=stdout,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dispatch {' '.join(args)} failed with exit {proc.returncode}")
    return elapsed, usage.ru_maxrss


def deliveries_in(url: str) -> int:
    """Delivery rows already in the database (a previous build is reused when it has the right size)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT COUNT(*) FROM deliveries")).scalar_one())
    except sa.exc.SQLAlchemyError:
        return -1
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--residents", type=int, default=1_000_000)
    ap.add_argument("--database-url", default="")
    ap.add_argument("--workdir", default=str(ROOT / "var" / "bench-audit"))
    ap.add_argument("--rebuild", action="store_true")
    opts = ap.parse_args()
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    url = opts.database_url or f"sqlite:///{work / f'audit-{opts.residents}.db'}"
    if opts.rebuild or deliveries_in(url) != opts.residents:
        if url.startswith("sqlite"):
            Path(url.split("///", 1)[1]).unlink(missing_ok=True)
        else:
            open_store(url).drop_all()
        build(url, opts.residents, 5000)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISPATCH_DATABASE_URL": url}
    env["DISPATCH_LOG_LEVEL"] = "WARNING"
    out_path = work / "export.csv"
    with out_path.open("w") as fh:
        elapsed, peak_kb = timed(["audit", "log", "--format", "csv"], env, fh)
    lines = sum(1 for _ in out_path.open()) - 1
    print(f"export: {lines} rows to CSV ({out_path.stat().st_size / 1e6:.0f} MB) in {elapsed:.1f}s, "
          f"{lines / elapsed:,.0f} rows/s, peak RSS {peak_kb / 1024:.0f} MB")  # fmt: skip
    v_elapsed, v_peak = timed(["audit", "verify"], env, subprocess.DEVNULL)
    print(f"verify: a run of {lines} deliveries in {v_elapsed:.1f}s, peak RSS {v_peak / 1024:.0f} MB")
    out_path.unlink()


if __name__ == "__main__":
    main()
