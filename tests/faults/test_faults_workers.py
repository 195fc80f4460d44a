"""Workers under faults, on private PostgreSQL and Redis: racing resumes, retries, a database outage,
SIGTERM mid-batch. After recovery: every key once in the gateway, nothing stranded, ledger complete.
The retries (delayed messages, ``.DQ`` queues) run on RabbitMQ too."""

from __future__ import annotations

import csv
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from datetime import datetime

import pytest

from dispatcher.providers.outbox.gateway import read_outbox
from tests.conftest import Project, stop_processes, wait_for
from tests.faults.support import (
    PrivatePostgres,
    check_recovery,
    start_run,
    status,
    wait_done,
    worker,
)

pytestmark = pytest.mark.slow


def test_two_resumes_racing_a_live_worker_send_no_one_twice(pg_redis_project: Project) -> None:
    # Redis only: the race is between two resumes' claims in the database; a worker killed mid-run and
    # resumed on RabbitMQ is test_redis_workers.py's kill -9 test
    project = pg_redis_project
    # 50-row batches of 20 ms messages: a live worker holds a re-queued batch for about a second
    project.env.update(
        {"DISPATCH_OUTBOX_LATENCY_MS": "20", "DISPATCH_BATCH_SIZE": "50", "DISPATCH_WORKER_STALE_AFTER": "3"}
    )
    project.registry(size=2000, seed=91)
    # an outbox with a history (earlier runs): a gateway lookup takes about a second, as in production,
    # which is the window in which a second resume works from a stale orphan list
    history = b"".join(
        b'{"key": "20200101-000000-000000:+8613%09d", "run_id": "20200101-000000-000000", "to": "+8613%09d", '
        rb'"body": "\u5386\u53f2\u6d88\u606f", "parts": 1, "encoding": "UCS-2"}'
        b"\n" % (i, i)
        for i in range(200_000)
    )
    project.outbox.write_bytes(history)
    victim, survivor = worker(project, "victim"), worker(project, "survivor")
    procs = [survivor]
    try:
        run_id = start_run(project)
        wait_for(lambda: status(project, run_id)["counts"].get("sent", 0) > 1000, 60, "sending to get going")
        store = project.runtime().store

        def held_by_victim() -> int:
            # rows in `sending` count every worker's claims: only the victim's make orphans
            return sum(n for holder, n in store.sending_holders(run_id).items() if f":{victim.pid}:" in holder)

        wait_for(lambda: held_by_victim() > 0, 30, "the victim to hold a claim", interval=0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        procs.append(worker(project, "replacement"))
        held = held_by_victim()
        assert held > 0, "the victim must die holding claims"
        time.sleep(max(0.0, 3.5 - (time.monotonic() - killed_at)))  # its heartbeat goes stale
        # two operators resume 0.6 s apart: the second reads the orphan list while the first is still
        # asking the gateway, and acts on it after a live worker has taken the re-queued rows again
        resumes = [project.popen("resume", run_id, "--no-wait", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
        time.sleep(0.6)
        resumes.append(project.popen("resume", run_id, "--no-wait", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        orphaned = 0
        for r in resumes:
            _, err = r.communicate(timeout=120)
            said = (err.strip().splitlines() or [""])[-1]
            print(f"\nresume exit {r.returncode}: {said[:200]} (victim held {held})")
            found = re.search(r": (\d+) orphaned", said)
            orphaned += int(found.group(1)) if found else 0
        assert orphaned > 0, "the resumes must find the victim's claims, or there was no race to lose"
        wait_done(project, run_id, 120)
        check_recovery(project, run_id)
    finally:
        stop_processes(procs)


def _phones(project: Project) -> list[str]:
    path = next((project.root / "var").glob("residents-*.csv"))
    with path.open(encoding="utf-8") as fh:
        return [row["phone"] for row in csv.DictReader(fh)]


def test_transient_failures_are_retried_on_time_and_strand_no_one(pg_broker_project: Project) -> None:
    project = pg_broker_project
    project.env["DISPATCH_BATCH_SIZE"] = "100"
    project.registry(size=2000, seed=92)
    phones = _phones(project)
    from dispatcher.phones import normalise

    failing = {normalise(p) for p in phones[::3]}  # a third of the numbers always answer "busy"
    project.env["DISPATCH_OUTBOX_FAIL_TRANSIENT"] = ",".join(sorted(failing))
    procs = [worker(project, "w1"), worker(project, "w2")]
    try:
        run_id = start_run(project)
        st = wait_done(project, run_id, 120)
        assert st["counts"].get("failed", 0) >= len(failing) * 0.9
        rows = list(project.runtime().store.deliveries(run_id))
        expected = {r.key for r in rows if r.reason != "opted_out" and r.phone not in failing}
        check_recovery(project, run_id, expected=expected)
        # backoff as designed: the second try ~1 s after the first, the third ~2 s after the second
        gaps: dict[int, list[float]] = {1: [], 2: [], 3: [], 4: []}
        store = project.runtime().store
        for row in rows:
            if row.phone in failing and row.reason != "opted_out":
                ats: list[datetime] = [a.at for a in store.attempts_for(row.id)]
                for i in range(1, min(len(ats), 5)):
                    gaps[i].append((ats[i] - ats[i - 1]).total_seconds())
        medians = {i: round(statistics.median(g), 2) for i, g in gaps.items() if g}
        print(f"\nmedian gap before try 2..5 (s): {medians}")
        for i, designed in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)):
            assert medians[i] < designed * 1.2 + 1.5, medians
    finally:
        stop_processes(procs)


def test_database_outage_after_send_loses_no_result_and_strands_no_row(
    pg_redis_project: Project, private_postgres: PrivatePostgres
) -> None:
    project = pg_redis_project
    # 20 ms a message: a batch spends 2 s handing over and milliseconds claiming and recording, so the
    # outage lands between some batch's hand-over and its record (at 4 ms it could miss every send phase)
    project.env.update({"DISPATCH_OUTBOX_LATENCY_MS": "20", "DISPATCH_BATCH_SIZE": "100"})
    project.registry(size=3000, seed=93)
    procs = [worker(project, "w1"), worker(project, "w2")]
    try:
        run_id = start_run(project)
        wait_for(lambda: status(project, run_id)["counts"].get("sent", 0) > 300, 60, "sending to start")
        private_postgres.stop()
        try:
            time.sleep(5)
            during = project.dispatch("status", run_id)
            assert during.returncode == 1
            line = during.stderr.strip().splitlines()[-1]
            assert "could not read" in line and "write" not in line, line
        finally:
            private_postgres.start()
        wait_done(project, run_id, 120)
        logs = "".join((project.root / "var" / f"{n}.log").read_text() for n in ("w1", "w2"))
        assert "batch.recorded_after_retry" in logs, "the outage must land between a send and its record"
        check_recovery(project, run_id)
    finally:
        if not private_postgres.running():
            private_postgres.start()
        stop_processes(procs)


def test_a_batch_that_loses_the_database_before_its_first_hand_over_gives_its_claim_back(
    pg_redis_project: Project, private_postgres: PrivatePostgres
) -> None:
    """The log goes away between a batch's claim and its frequency-cap read: nothing was sent, so the
    rows must go back to pending once the log returns. Left in ``sending`` under a live worker, no
    redelivered message could claim them and ``resume`` would leave them alone."""
    import sqlalchemy as sa

    from dispatcher.errors import StoreError
    from dispatcher.sender import process_batch

    project = pg_redis_project
    project.env["DISPATCH_BATCH_SIZE"] = "40"
    project.registry(size=120, seed=94)
    run_id = start_run(project)
    rt = project.runtime()
    cut = threading.Event()
    restart: list[threading.Timer] = []

    def cut_before_the_cap_read(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if cut.is_set() or "GROUP BY deliveries.resident_id" not in statement:
            return
        private_postgres.stop()  # every session is cut: this very read fails
        cut.set()

    def back_after_the_first_reconnect(*_args):  # type: ignore[no-untyped-def]
        # the outage outlasts the batch's first try to give its rows back, however long logging takes
        if cut.is_set() and not restart:
            restart.append(threading.Timer(1.0, private_postgres.start))
            restart[0].start()

    sa.event.listen(rt.store.engine, "before_cursor_execute", cut_before_the_cap_read)
    sa.event.listen(rt.store.engine, "do_connect", back_after_the_first_reconnect)
    try:
        with pytest.raises(StoreError):
            process_batch(rt, run_id, 0)
    finally:
        sa.event.remove(rt.store.engine, "before_cursor_execute", cut_before_the_cap_read)
        sa.event.remove(rt.store.engine, "do_connect", back_after_the_first_reconnect)
        for timer in restart:
            timer.join(60)
        if not private_postgres.running():
            private_postgres.start()
    assert cut.is_set(), "the outage must land between the claim and the first hand-over"
    counts = status(project, run_id)["counts"]
    assert counts.get("sending", 0) == 0, counts
    assert counts["pending"] > 0, counts
    assert not project.outbox.exists() or not project.outbox.read_text(), "nothing may have been sent"
    # the message comes again (Dramatiq retries it) and the batch goes out, each person once
    again = process_batch(rt, run_id, 0)
    keys = [line["key"] for line in read_outbox(project.outbox)]
    print(
        f"\nafter the outage: counts {counts}; retried batch claimed {again.claimed}, {len(keys)} outbox lines, "
        f"{len(set(keys))} distinct keys, counts {dict(again.counts)}"
    )
    assert again.claimed > 0 and len(keys) == again.counts["sent"] == len(set(keys)), again


def test_sigterm_during_a_long_batch_releases_its_claim_and_exits_promptly(pg_redis_project: Project) -> None:
    project = pg_redis_project
    project.env.update({"DISPATCH_OUTBOX_LATENCY_MS": "150", "DISPATCH_BATCH_SIZE": "300"})
    project.registry(size=320, seed=94)
    first = worker(project, "first", threads=1)
    procs = [first]
    try:
        run_id = start_run(project)
        wait_for(lambda: status(project, run_id)["counts"].get("sending", 0) > 0, 60, "a batch to be claimed")
        time.sleep(2)  # a few messages out of a batch that would take about 45 s
        first.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        first.wait(40)
        took = time.monotonic() - stopped_at
        print(f"\nworker exited {took:.1f}s after SIGTERM")
        assert took < 10, "the worker must stop handing out sends, not finish the batch"
        assert status(project, run_id)["counts"].get("sending", 0) == 0, "claimed rows released before exit"
        procs.append(worker(project, "second", env={"DISPATCH_OUTBOX_LATENCY_MS": "0"}))
        wait_done(project, run_id, 60)
        check_recovery(project, run_id)
    finally:
        stop_processes(procs)
