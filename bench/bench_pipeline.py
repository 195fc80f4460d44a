"""Pipeline benchmark: bare Dramatiq versus our fan-out and end-to-end rates, and peak memory.

Prints, in one run and on the same Redis:
  * bare Dramatiq: no-op enqueue rate, and no-op processing rate with two worker processes;
  * our fan-out rate: recipients selected, written to the delivery log and enqueued per second
    (the `dispatch run --no-wait` process);
  * our end-to-end rate: recipients sent through the outbox and recorded per second with two
    `dispatch worker` processes;
  * peak RSS of the `dispatch run` process and of each worker at 10,000 and 200,000 recipients.
Targets: fan-out >= 10x bare enqueue; end-to-end >= 1.5x bare processing;
peak RSS at 200,000 <= 1.3x that at 10,000.

Usage: python bench/bench_pipeline.py [--sizes 10000,200000] [--database postgresql|sqlite]
Needs Redis (DISPATCH_TEST_REDIS_URL, default redis://127.0.0.1:6379/0); PostgreSQL for the
default database (DISPATCH_TEST_POSTGRES_URL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.noop_worker import declare  # noqa: E402
from dispatcher.audience import generate, parse_row  # noqa: E402
from dispatcher.store import iter_chunks, open_store  # noqa: E402

REDIS_URL = os.environ.get("DISPATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("DISPATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CAMPAIGN = "campaigns/quarterly-themes.yaml"
WORKER_THREADS = 4
DISPATCH = (sys.executable, "-m", "dispatcher")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"worker did not start: {line!r}")


def bare_dramatiq(n: int) -> tuple[float, float]:
    """No-op messages: enqueue rate with no consumer, then processing rate of two idle-ready workers."""
    namespace = f"bench-bare-{uuid.uuid4().hex[:6]}"
    broker, actor = declare(REDIS_URL, namespace)
    start = time.perf_counter()
    for i in range(n):
        actor.send(i)
    enqueue_rate = n / (time.perf_counter() - start)
    for key in broker.client.scan_iter(f"{namespace}*"):
        broker.client.delete(key)
    workers = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "noop_worker.py"), REDIS_URL, namespace, str(WORKER_THREADS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for w in workers:
        wait_ready(w)
    queue_key = f"{namespace}:noop"
    done = broker.client.register_script("return redis.call('llen', KEYS[1]) + redis.call('hlen', KEYS[2])")
    start = time.perf_counter()
    for i in range(n):  # enqueueing (~5x faster than processing) overlaps with the workers draining
        actor.send(i)
    while done(keys=[queue_key, f"{queue_key}.msgs"]) > 0:
        time.sleep(0.005)
    process_rate = n / (time.perf_counter() - start)
    for w in workers:
        w.terminate()
        w.wait(30)
    for key in broker.client.scan_iter(f"{namespace}*"):
        broker.client.delete(key)
    return enqueue_rate, process_rate


def fresh_database(kind: str, workdir: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'dispatch.db'}", None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", schema


def drop_schema(schema: str | None) -> None:
    if schema:
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def pipeline(size: int, kind: str) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    shutil.copytree(ROOT / "campaigns", workdir / "campaigns")
    shutil.copytree(ROOT / "templates", workdir / "templates")
    (workdir / "var").mkdir()
    db_url, schema = fresh_database(kind, workdir)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")},
        "PYTHONPATH": str(ROOT),
        "DISPATCH_DATABASE_URL": db_url,
        "DISPATCH_BROKER_URL": REDIS_URL,
        "DISPATCH_BROKER_NAMESPACE": namespace,
        "DISPATCH_OUTBOX_PATH": str(workdir / "var" / "outbox.jsonl"),
        "DISPATCH_LOG_LEVEL": "WARNING",
        "DISPATCH_WORKER_THREADS": str(WORKER_THREADS),
        "DISPATCH_BATCH_SIZE": "500",
        # bulk sends only go out 08:00-21:00 in Shanghai: benchmark at 10:00 there whatever the hour
        "DISPATCH_FAKE_NOW": time.strftime("%Y-%m-%dT10:00:00+08:00"),
    }
    try:
        store = open_store(db_url)
        for chunk in iter_chunks((parse_row(row) for row in generate(size, seed=size)), 2000):
            store.upsert_residents(chunk)
        # two idle workers, ready before the run is enqueued
        workers = [
            subprocess.Popen([sys.executable, "-m", "dispatcher", "worker"], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
            for _ in range(2)
        ]  # fmt: skip
        with store.engine.connect() as conn:
            while conn.execute(sa.text("select count(*) from workers")).scalar_one() < 2:
                time.sleep(0.05)
        # fan-out: the `dispatch run --no-wait` process (it reports its own fan-out time)
        run = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "maxrss.py"), *DISPATCH, "run", CAMPAIGN, "--no-wait", "--json"],
            cwd=workdir, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"dispatch run failed: {run.stderr}")
        st = json.loads(run.stdout)
        run_id, pending = st["run_id"], st["total"] - st["counts"].get("skipped", 0)
        fanout_seconds = st["fanout_seconds"]
        enqueued_at = st["enqueued_at"]
        run_rss = float(run.stderr.strip().splitlines()[-1].split("=")[1])
        # end to end: from the moment the batches were enqueued until nothing is open
        while store.get_run(run_id).status != "completed":  # a cheap poll: no COUNT over the run
            time.sleep(0.05)
        e2e_seconds = time.time() - enqueued_at
        worker_rss = [peak_rss_mb(w.pid) for w in workers]
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(60)
        sent = store.counts(run_id).get("sent", 0)
        with open(workdir / "var" / "outbox.jsonl", "rb") as fh:
            lines = sum(1 for _ in fh)
        store.close()
        return {
            "size": size,
            "pending": pending,
            "sent": sent,
            "outbox_lines": lines,
            "fanout_rate": st["total"] / fanout_seconds,
            "fanout_seconds": fanout_seconds,
            "e2e_rate": sent / e2e_seconds,
            "e2e_seconds": e2e_seconds,
            "run_rss_mb": run_rss,
            "worker_rss_mb": max(worker_rss),
        }
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{namespace}*"):
            client.delete(key)
        drop_schema(schema)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,200000")
    parser.add_argument("--database", default="postgresql", choices=("postgresql", "sqlite"))
    parser.add_argument("--bare-messages", type=int, default=20000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# bench_pipeline: Redis {REDIS_URL.split('@')[-1]}, database {args.database}, "
          f"{WORKER_THREADS} threads per worker, 2 worker processes, batch 500")  # fmt: skip
    enqueue_rate, process_rate = bare_dramatiq(args.bare_messages)
    print(f"bare dramatiq enqueue      {enqueue_rate:10.0f} msg/s   ({args.bare_messages} no-op messages)")
    print(f"bare dramatiq processing   {process_rate:10.0f} msg/s   (2 worker processes)")
    results = [pipeline(size, args.database) for size in sizes]
    for r in results:
        print(
            f"recipients {r['size']:>7}: fan-out {r['fanout_rate']:9.0f}/s ({r['fanout_seconds']:.2f} s)  "
            f"end-to-end {r['e2e_rate']:8.0f}/s ({r['e2e_seconds']:.2f} s)  "
            f"sent {r['sent']} = outbox {r['outbox_lines']}  "
            f"peak RSS run {r['run_rss_mb']:.0f} MB, worker {r['worker_rss_mb']:.0f} MB"
        )
    big = results[-1]
    small = results[0]
    checks = {
        "fan-out >= 10x bare enqueue": (big["fanout_rate"] / enqueue_rate, 10.0),
        "end-to-end >= 1.5x bare processing": (big["e2e_rate"] / process_rate, 1.5),
    }
    if len(results) > 1:
        checks["run RSS(200k) <= 1.3x RSS(10k)"] = (small["run_rss_mb"] * 1.3 / big["run_rss_mb"], 1.0)
        checks["worker RSS(200k) <= 1.3x RSS(10k)"] = (small["worker_rss_mb"] * 1.3 / big["worker_rss_mb"], 1.0)
    ok = True
    for name, (ratio, target) in checks.items():
        passed = ratio >= target
        ok &= passed
        label = f"{ratio:.2f}x" if "RSS" not in name else f"margin {ratio:.2f}"
        print(f"{'PASS' if passed else 'FAIL'} {name}: {label}")
    consistent = all(r["sent"] == r["outbox_lines"] == r["pending"] for r in results)
    print(f"{'PASS' if consistent else 'FAIL'} every pending recipient sent once (delivery log = outbox)")
    return 0 if ok and consistent else 1


if __name__ == "__main__":
    sys.exit(main())
