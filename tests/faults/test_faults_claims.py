"""Claims are fenced on their token: a stale orphan list cannot take a live claim, and a result for a
row that was taken away is still on the ledger (store level, SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from dispatcher import audit
from dispatcher.store import Outcome, open_store
from tests.test_store import ALL, _residents
from tests.test_store import _spec as _bare_spec

pytestmark = pytest.mark.slow


def _spec(run_id: str, batch_size: int = 10):  # type: ignore[no-untyped-def]
    """A run whose snapshot hashes match its text, so `verify` checks the chain and the attempts."""
    import dataclasses
    import hashlib

    spec = _bare_spec(run_id, batch_size)
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return dataclasses.replace(spec, campaign_sha256=sha(spec.campaign_yaml), template_sha256=sha(spec.template_text))


def _sent(row, token: str | None = None) -> Outcome:  # type: ignore[no-untyped-def]
    return Outcome(
        id=row.id, key=row.key, run_id=row.run_id, state="sent", attempt=row.attempts, gateway="outbox",
        outcome="sent", provider_id=f"outbox:{row.key}", claim_token=token or row.claim_token,
    )  # fmt: skip


def test_a_stale_resume_cannot_requeue_rows_a_live_worker_reclaimed(database_url: str) -> None:
    store = open_store(database_url)
    store.upsert_residents(_residents(10))
    store.create_run(_spec("r1", batch_size=10), ALL)
    victim = store.claim("r1", 0, "victim")  # the victim dies holding these
    stale = store.orphans("r1", stale_after_seconds=10)  # resume B reads its list...
    assert store.requeue(store.orphans("r1", stale_after_seconds=10)) == len(victim)  # ...resume A acts first
    live = store.claim("r1", 0, "survivor")  # and a live worker takes the rows again
    assert store.requeue(stale, actor="resume-b") == 0, "a stale list must not take a live claim"
    store.record([_sent(r) for r in live])
    assert store.counts("r1") == {"sent": len(live), "skipped": 1}
    assert [r.problem for r in audit.verify(store, "r1")] == [None]
    store.close()


def test_a_send_whose_row_was_taken_away_is_still_on_the_ledger(database_url: str) -> None:
    store = open_store(database_url)
    store.upsert_residents(_residents(10))
    store.create_run(_spec("r1", batch_size=10), ALL)
    frozen = store.claim("r1", 0, "frozen")  # a worker freezes mid-batch; its rows are judged orphaned
    store.requeue(store.orphans("r1", stale_after_seconds=10), actor="watchdog")
    other = store.claim("r1", 0, "other")  # another worker sends the first half
    store.record([_sent(r) for r in other[:4]])
    store.release([r.id for r in other[4:]], other[0].claim_token)
    # the frozen worker wakes and reports what it had handed over before it froze
    store.record([_sent(r) for r in frozen])
    late = [e for e in _events(store, "r1") if e["kind"] == "delivery.late"]
    assert len(late) == 4, "hand-overs to rows someone else settled are kept as delivery.late events"
    settled = [e for e in _events(store, "r1") if e["reason"] == "late_result"]
    assert len(settled) == len(frozen) - 4, "a late sent settles a row that went back to pending"
    assert store.counts("r1") == {"sent": len(frozen), "skipped": 1}
    assert sum(len(store.attempts_for(r.id)) for r in frozen) == len(frozen) + 4
    assert [r.problem for r in audit.verify(store, "r1")] == [None]
    store.close()


def test_verify_flags_an_attempt_without_its_ledger_event(database_url: str) -> None:
    import sqlalchemy as sa

    from dispatcher.store import schema as t

    store = open_store(database_url)
    store.upsert_residents(_residents(5))
    store.create_run(_spec("r1", batch_size=10), ALL)
    rows = store.claim("r1", 0, "w")
    store.record([_sent(r) for r in rows])
    with store.engine.begin() as conn:  # a hand-over recorded behind the ledger's back
        conn.execute(
            sa.insert(t.attempts).values(
                delivery_id=rows[0].id, run_id="r1", attempt=2, gateway="outbox", outcome="sent",
                at=sa.func.now(),
            )
        )  # fmt: skip
    problems = [str(r.problem) for r in audit.verify(store, "r1")]
    assert "has no ledger event" in problems[0]
    store.close()


def test_verify_flags_a_batch_result_whose_attempt_row_was_deleted(database_url: str) -> None:
    import dataclasses

    import sqlalchemy as sa

    from dispatcher.store import schema as t

    store = open_store(database_url)
    store.upsert_residents(_residents(5))
    store.create_run(_spec("r1", batch_size=10), ALL)
    rows = store.claim("r1", 0, "w")
    # as a worker records them: each result carries its batch, so the batch's results are one event
    store.record([dataclasses.replace(_sent(r), batch=r.batch) for r in rows])
    assert [r.problem for r in audit.verify(store, "r1")] == [None]
    with store.engine.begin() as conn:  # a send that leaves no attempt behind: the ledger's event is a forgery
        e = t.events
        result = conn.execute(sa.select(e.c.id, e.c.seq).where(e.c.kind == "batch.recorded", e.c.run_id == "r1")).one()
        conn.execute(sa.delete(t.attempts).where(t.attempts.c.delivery_id == rows[2].id))
    problem = next(r.problem for r in audit.verify(store, "r1"))
    assert problem is not None and problem.event_id == result.id and problem.seq == result.seq
    assert f"hand-over event of delivery {rows[2].id} has no attempt row" in str(problem)
    store.close()


def _events(store, run_id: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    import sqlalchemy as sa

    from dispatcher.store import schema as t

    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(t.events).where(t.events.c.run_id == run_id)).mappings()]


def test_rows_a_worker_claims_while_its_heartbeat_lags_are_not_taken_for_orphans(database_url: str) -> None:
    """A worker back from a network cut claims at once while its heartbeat thread is still stuck on a
    connection that hung: the claim itself shows it alive, so the leader leaves those rows to it."""
    from datetime import timedelta

    from dispatcher.clock import utcnow

    now = [utcnow()]
    store = open_store(database_url, clock=lambda: now[0])
    store.upsert_residents(_residents(10))
    store.create_run(_spec("r1", batch_size=10), ALL)
    store.heartbeat("returning", "w1", 4242)  # its last beat before the cut
    now[0] += timedelta(seconds=60)  # the cut, far longer than the stale window
    assert "returning" not in store.live_workers(10)
    claimed = store.claim("r1", 0, "returning")
    assert claimed
    assert store.orphans("r1", stale_after_seconds=10) == [], "a worker that just claimed is not dead"
    now[0] += timedelta(seconds=11)  # and if it then goes silent for the stale window, they are orphans again
    assert len(store.orphans("r1", stale_after_seconds=10)) == len(claimed)
    store.close()


def _cut_off_worker(database_url: str):  # type: ignore[no-untyped-def]
    """A store on a clock the test moves, and a worker that claimed batch 0 and was then cut off past the
    stale window: the leader lists its rows as orphans (with the ``claimed_at`` it read)."""
    from datetime import timedelta

    from dispatcher.clock import utcnow

    now = [utcnow()]
    store = open_store(database_url, clock=lambda: now[0])
    store.upsert_residents(_residents(10))
    store.create_run(_spec("r1", batch_size=10), ALL)
    store.heartbeat("w1", "host-1", 4242)
    claimed = store.claim("r1", 0, "w1")
    now[0] += timedelta(seconds=60)  # the cut, far longer than the stale window
    orphans = store.orphans("r1", stale_after_seconds=10)
    assert [o.id for o in orphans] == [r.id for r in claimed]
    now[0] += timedelta(seconds=1)
    return store, claimed, orphans


def test_rows_their_worker_renews_after_the_orphan_list_are_left_to_it(database_url: str) -> None:
    """The link comes back while the leader looks the orphans up: the worker renews its claim before
    handing the rows over, so the leader's requeue (fenced on ``claimed_at``) moves none of them and the
    worker's results record as usual, with no late result and no second send."""
    store, claimed, orphans = _cut_off_worker(database_url)
    token = claimed[0].claim_token
    assert store.renew_claim("r1", token) == {r.id for r in claimed}, "the worker still holds every row"
    assert store.requeue(orphans, actor="watchdog") == 0, "a renewed claim must not be requeued"
    seen = {o.id: (o.claim_token, o.claimed_at) for o in orphans}
    assert store.provider_events.mark_unknown("r1", [o.id for o in orphans], reason="orphan_no_lookup", seen=seen) == 0
    assert store.orphans("r1", stale_after_seconds=10) == [], "a renewal shows the worker alive again"
    store.record([_sent(r) for r in claimed])
    assert store.counts("r1") == {"sent": len(claimed), "skipped": 1}
    events = _events(store, "r1")
    assert not [e for e in events if e["kind"] == "delivery.late" or e["reason"] in ("late_result", "requeued")]
    assert sum(len(store.attempts_for(r.id)) for r in claimed) == len(claimed)
    assert [r.problem for r in audit.verify(store, "r1")] == [None]
    store.close()


def test_a_renewal_after_the_leaders_requeue_finds_every_row_taken_away(database_url: str) -> None:
    """The reverse order: the leader requeues first; the worker's renewal then holds nothing, so it hands
    nothing over, and the worker that claims the rows next is the only one to send them."""
    store, claimed, orphans = _cut_off_worker(database_url)
    assert store.requeue(orphans, actor="watchdog") == len(claimed)
    assert store.renew_claim("r1", claimed[0].claim_token) == set(), "nothing is left to hand over"
    other = store.claim("r1", 0, "w2")
    assert {r.id for r in other} == {r.id for r in claimed}
    assert store.renew_claim("r1", claimed[0].claim_token) == set(), "a new claim is not the old one's"
    store.record([_sent(r) for r in other])
    assert store.counts("r1") == {"sent": len(claimed), "skipped": 1}
    assert sum(len(store.attempts_for(r.id)) for r in claimed) == len(claimed)
    assert [r.problem for r in audit.verify(store, "r1")] == [None]
    store.close()


def test_a_renewal_racing_the_leaders_requeue_wins_each_row_or_loses_it_never_both(database_url: str) -> None:
    """Renewal and requeue run at the same moment, from two connections, many times: for every row the
    database picks exactly one side (rows renewed stay ``sending`` under the claim, the others are pending)."""
    from datetime import timedelta

    from dispatcher.clock import utcnow

    now = [utcnow()]
    worker = open_store(database_url, clock=lambda: now[0])
    leader = open_store(database_url, clock=lambda: now[0])
    worker.upsert_residents(_residents(60))
    worker.create_run(_spec("r1", batch_size=100), ALL)
    for _ in range(15):
        claimed = worker.claim("r1", 0, "w1")
        token, ids = claimed[0].claim_token, {r.id for r in claimed}
        orphans = leader.orphans("r1", stale_after_seconds=10, older_than=now[0] + timedelta(seconds=1))
        assert {o.id for o in orphans} == ids
        now[0] += timedelta(seconds=1)
        renewed, requeued = _race(worker, leader, token, orphans)
        assert len(renewed) + requeued == len(ids), "each row goes to exactly one side"
        assert worker.still_claimed(sorted(ids), token) == renewed
        counts = worker.counts("r1")
        assert counts.get("sending", 0) == len(renewed) and counts.get("pending", 0) == requeued
        worker.release(sorted(renewed), token)  # the whole batch pending again for the next round
    assert [r.problem for r in audit.verify(worker, "r1")] == [None]
    leader.close()
    worker.close()


def _race(worker, leader, token: str | None, orphans: list) -> tuple[set[int], int]:  # type: ignore[no-untyped-def,type-arg]
    """The worker's renewal and the leader's requeue released at the same instant; (renewed, requeued)."""
    import threading

    from dispatcher.errors import StoreError

    start = threading.Barrier(2)
    renewed: list[set[int]] = []
    requeued: list[int] = []

    def renew() -> None:
        start.wait()
        for _ in range(2):  # as the worker's gate does: a renewal that failed is asked again
            try:
                renewed.append(worker.renew_claim("r1", token) or set())
                return
            except StoreError:
                continue

    def requeue() -> None:
        start.wait()
        try:
            requeued.append(leader.requeue(orphans, actor="watchdog"))
        except StoreError:
            requeued.append(0)  # a transaction the database aborted moved nothing

    threads = [threading.Thread(target=renew), threading.Thread(target=requeue)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(renewed) == 1 and len(requeued) == 1, "both sides answered"
    return renewed[0], requeued[0]


def _gate_on_a_claimed_batch(project):  # type: ignore[no-untyped-def]
    """A real worker runtime that claimed batch 0 of a run, its gate, and the batch's rows as chunks."""
    from dispatcher.batch import RUNS
    from dispatcher.campaigns import load_campaign
    from dispatcher.runs import start_run
    from dispatcher.sender import Gate
    from tests.conftest import approve_campaign

    project.registry(size=40, seed=7)
    project.env["DISPATCH_WORKER_STALE_AFTER"] = "1"  # renewals due every third of a second
    project.env["DISPATCH_BATCH_SIZE"] = "10"
    path = project.root / "campaigns" / "refund-scam-lucheng.yaml"
    rt = project.runtime()
    approve_campaign(rt, path)
    run_id = start_run(rt, load_campaign(path, project.root / "templates")).run_id
    rows = rt.store.claim(run_id, 0, rt.worker_id)
    gate = Gate(rt, RUNS.get(rt, run_id))
    # the gate looks only at the rows and their claim; the messages are not handed to anyone here
    chunks = [[(row, None)] for row in rows]
    return rt, run_id, rows, gate, chunks


def test_a_gate_hands_over_none_of_the_rows_the_leader_requeued_before_its_renewal(any_db_project) -> None:  # type: ignore[no-untyped-def]
    """The leader requeued the batch while the worker was away; the worker's first check renews, finds
    them taken, and so does the chunk right after, although the log is asked at most every CHECK_EVERY."""
    import time
    from datetime import timedelta

    rt, run_id, rows, gate, chunks = _gate_on_a_claimed_batch(any_db_project)
    orphans = rt.store.orphans(run_id, 1, older_than=rt.clock() + timedelta(seconds=60))
    assert rt.store.requeue(orphans, actor="watchdog") == len(rows)
    time.sleep(gate.CHECK_EVERY + 0.1)  # past the check interval and a third of the stale window
    assert gate.taken_away(chunks[0]) == {rows[0].id}
    assert gate.taken_away(chunks[1]) == {rows[1].id}, "the next chunk, between checks, is known taken too"


def test_a_gate_that_renewed_keeps_its_rows_from_the_leaders_requeue(any_db_project) -> None:  # type: ignore[no-untyped-def]
    """The leader listed the batch as orphans, then the worker's gate renewed before the requeue: the
    requeue moves nothing and the gate hands every chunk over."""
    import time
    from datetime import timedelta

    rt, run_id, rows, gate, chunks = _gate_on_a_claimed_batch(any_db_project)
    orphans = rt.store.orphans(run_id, 1, older_than=rt.clock() + timedelta(seconds=60))
    assert len(orphans) == len(rows)
    time.sleep(gate.CHECK_EVERY + 0.1)
    assert gate.taken_away(chunks[0]) == set()
    assert rt.store.requeue(orphans, actor="watchdog") == 0, "a claim renewed after the orphan list stays"
    assert all(gate.taken_away(chunk) == set() for chunk in chunks[1:])
    assert rt.store.counts(run_id).get("sending") == len(rows)


def test_a_claim_is_one_event_naming_its_rows_and_verify_reads_it_as_each_rows_change(database_url: str) -> None:
    """A batch's claim is one ``batch.claimed`` event; verify still holds each row to it: a claimed row
    is ``sending`` by its ledger, and reads ``pending`` in the table only while its lease is live, so a
    lease dropped behind the ledger (its rows back to plain ``pending``) is caught."""
    import json

    import sqlalchemy as sa

    store = open_store(database_url)
    store.upsert_residents(_residents(10))
    store.create_run(_spec("r1", batch_size=10), ALL)
    claimed = store.claim("r1", 0, "w1")
    claims = [e for e in _events(store, "r1") if e["kind"] == "batch.claimed"]
    assert len(claims) == 1 and claims[0]["batch"] == 0 and claims[0]["actor"] == "w1"
    assert json.loads(claims[0]["payload"])["ids"] == sorted(r.id for r in claimed)
    assert [r.problem for r in audit.verify(store, "r1")] == [None], "a run mid-claim verifies"
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM batch_leases WHERE token = :t"), {"t": claimed[0].claim_token})
    problem = str(next(audit.verify(store, "r1")).problem)
    assert f"delivery {claimed[0].id} is 'pending'" in problem and "last event says 'sending'" in problem, problem
    assert f"event {claims[0]['id']} " in problem, "the break names the claim event"
    store.close()
