"""The delivery log behaves the same on SQLite and PostgreSQL: runs, claims, results, orphans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.store import AudienceFilter, Claimed, CreatedRun, DuplicateRun, Outcome, Resident, RunSpec, open_store
from dispatcher.store import schema as t

ALL = AudienceFilter(districts=("henglin", "yaoguan"))


def _residents(n: int) -> list[Resident]:
    return [
        Resident(
            phone=f"+86138{i:08d}",
            name=f"居民{i}",
            district="henglin" if i % 2 else "yaoguan",
            grid="HL-01" if i % 2 else "YG-01",
            segments=("retirees",) if i % 3 == 0 else ("workers", "parents"),
            opted_out=(i == 7),
        )
        for i in range(n)
    ]


def _spec(run_id: str, batch_size: int = 10, fire_time=None) -> RunSpec:  # type: ignore[no-untyped-def]
    return RunSpec(
        run_id=run_id, campaign_id="c1", title="t", owner="police", channel="sms", priority="bulk", reason=None,
        gateway="outbox", campaign_path="c.yaml", campaign_yaml="id: c1",
        campaign_sha256=hashlib.sha256(b"id: c1").hexdigest(), template_name="x.j2", template_text="hi",
        template_sha256=hashlib.sha256(b"hi").hexdigest(), send_by=None,
        batch_size=batch_size, fire_time=fire_time,
    )  # fmt: skip


def _sent(claimed: list[Claimed]) -> list[Outcome]:
    """The outbox's answer for each claimed row: sent, under the row's claim."""
    return [
        Outcome(id=c.id, run_id=c.run_id, state="sent", attempt=c.attempts, gateway="outbox", outcome="sent",
                provider_id=f"p{c.id}", parts=1, claim_token=c.claim_token, key=c.key, batch=c.batch)
        for c in claimed
    ]  # fmt: skip


@pytest.fixture
def store(database_url: str):  # type: ignore[no-untyped-def]
    s = open_store(database_url)
    yield s
    s.close()


def test_schema_is_created_and_versioned(store) -> None:  # type: ignore[no-untyped-def]
    assert store.schema_version() == t.SCHEMA_VERSION
    if not store.is_sqlite:
        # keys are identifiers: compared byte by byte, not under the database's locale
        assert _key_collations(store.engine) == {"deliveries": "C", "events": "C"}
    store.migrate()  # idempotent
    assert store.schema_version() == t.SCHEMA_VERSION


def test_run_writes_one_row_per_selected_resident_with_opted_out_skipped(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(45))
    created = store.create_run(_spec("r1"), ALL)
    assert created == CreatedRun(run_id="r1", total=45, pending=44, batches=5)
    counts = store.counts("r1")
    assert counts == {"pending": 44, "skipped": 1}
    rows = list(store.deliveries("r1"))
    assert len({r.key for r in rows}) == 45
    assert all(r.key == f"r1:{r.phone}" for r in rows)
    skipped = [r for r in rows if r.state == "skipped"]
    assert skipped[0].reason == "opted_out" and skipped[0].phone == "+8613800000007"


def test_segment_and_grid_filters_select_in_the_database(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(30))
    only_retirees = AudienceFilter(districts=("henglin",), segments=("retirees",))
    created = store.create_run(_spec("r1"), only_retirees)
    expected = sum(1 for i in range(30) if i % 2 and i % 3 == 0)
    assert created.total == expected
    not_parents = AudienceFilter(districts=("henglin", "yaoguan"), exclude_segments=("parents",))
    assert store.create_run(_spec("r2"), not_parents).total == sum(1 for i in range(30) if i % 3 == 0)


def test_a_batch_is_claimed_once_even_when_the_message_is_delivered_twice(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(25))
    store.create_run(_spec("r1"), ALL)
    pending_in_batch_0 = sum(1 for r in store.deliveries("r1") if r.batch_no == 0 and r.state == "pending")
    first = store.claim("r1", 0, "worker-a")
    second = store.claim("r1", 0, "worker-b")
    assert len(first) == pending_in_batch_0 == 9  # resident 7 (opted out) sits in batch 0 as `skipped`
    assert second == []
    assert all(c.attempts == 1 for c in first)


def test_results_are_recorded_with_attempts_and_only_for_rows_in_flight(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(5))
    store.create_run(_spec("r1"), ALL)
    claimed = store.claim("r1", 0, "w")
    outcomes = [
        Outcome(
            id=c.id,
            run_id="r1",
            state="sent",
            attempt=1,
            gateway="outbox",
            outcome="sent",
            provider_id=f"p{c.id}",
            parts=2,
        )
        for c in claimed
    ]
    store.record(outcomes)
    assert store.counts("r1") == {"sent": 5}
    assert store.parts_sent("r1") == 10
    assert store.finish_if_done("r1") is True
    assert store.get_run("r1").status == "completed"
    store.record(outcomes)  # a replay changes nothing: rows are no longer in flight
    assert len(store.attempts_for(claimed[0].id)) == 1


def test_after_a_batch_the_log_says_when_its_retries_are_due_and_whether_the_run_is_still_open(
    database_url: str,
) -> None:
    # a worker asks this after every batch: when to bring the batch back, and whether to finish the run
    now = [datetime(2026, 12, 1, 2, 0, tzinfo=UTC)]
    store = open_store(database_url, clock=lambda: now[0])
    try:
        store.upsert_residents(_residents(4))
        store.create_run(_spec("r1", batch_size=2), ALL)
        assert store.batch_left("r1", 0) == (None, True)
        first = store.claim("r1", 0, "w")
        due = now[0] + timedelta(minutes=5)
        retry = dataclasses.replace(
            _sent(first[:1])[0], state="pending", outcome="retry", provider_id=None, next_attempt_at=due
        )
        store.record([retry, *_sent(first[1:])])
        assert store.batch_left("r1", 0) == (due, True)
        assert store.batch_left("r1", 1) == (None, True)
        store.record(_sent(store.claim("r1", 1, "w")))
        # batch 1 is settled, but batch 0's postponed row keeps the run open
        assert store.batch_left("r1", 1) == (None, True)
        now[0] = due
        store.record(_sent(store.claim("r1", 0, "w")))
        assert store.batch_left("r1", 0) == (None, False)
    finally:
        store.close()


def test_results_hashed_before_the_write_are_hashed_again_if_their_chain_grew_meanwhile(tmp_path: Path) -> None:
    # on SQLite a batch's ledger events are hashed before the write lock is taken, against the chain's tail
    # as read then; another event appended to the same batch chain in between (here a row of the batch
    # released by another writer) must not be overwritten or forked: the events are hashed again under
    # the lock, every result is recorded once, and the run's ledger still verifies
    from sqlalchemy import event

    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    try:
        store.upsert_residents(_residents(6))
        spec = _spec("r1")
        sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731 - the snapshot verify checks
        store.create_run(
            dataclasses.replace(spec, campaign_sha256=sha(spec.campaign_yaml), template_sha256=sha(spec.template_text)),
            ALL,
        )
        claimed = store.claim("r1", 0, "w")
        assert len(claimed) == 6
        kept, other = claimed[:5], claimed[5]
        outcomes = _sent(kept)
        moved: list[int] = []

        def append_to_the_chain_after_the_draft_read_it(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
            if "ledger_tails.batch IN" in statement and not moved:  # the draft reads its tails with IN
                moved.append(store.release([other.id], other.claim_token))

        event.listen(store.engine, "after_cursor_execute", append_to_the_chain_after_the_draft_read_it)
        store.record(outcomes)
        assert moved == [1], "no other event was appended between the draft and the write"
        assert store.counts("r1") == {"sent": 5, "pending": 1}
        checked, problem = store.audit.verify_run("r1")
        assert problem is None, str(problem)
        assert checked == 4  # the head, then the claim, the release and the five results on the batch chain
        with store.engine.connect() as conn:
            chain = conn.execute(
                sa.select(t.events.c.kind, t.events.c.to_state, t.events.c.seq, t.events.c.payload)
                .where(t.events.c.run_id == "r1", t.events.c.batch == 0)
                .order_by(t.events.c.seq)
            ).all()
        # the claim, the release appended meanwhile, then the five results after it (one event naming each)
        assert [(k, s) for k, s, _, _ in chain] == [
            ("batch.claimed", "sending"), ("delivery.state", "pending"), ("batch.recorded", None)
        ]  # fmt: skip
        assert [seq for _, _, seq, _ in chain] == list(range(3))
        results = json.loads(chain[-1].payload)["rows"]
        assert [(row[0], row[1]) for row in results] == [(c.id, "sent") for c in kept]
    finally:
        store.close()


def test_a_connection_lost_while_results_are_written_is_an_outage_and_the_retry_records_them_once(
    postgres_url: str,
) -> None:
    # the results reach PostgreSQL as one UPDATE over arrays, then the attempts and the ledger event: a
    # connection cut after the UPDATE is a StoreError (what the worker retries and spools on), leaves no
    # row half recorded, and the retry on a new connection records each once
    from sqlalchemy import event

    from dispatcher.errors import StoreError

    store = open_store(postgres_url)
    killer = sa.create_engine(postgres_url.split("?")[0])
    try:
        store.upsert_residents(_residents(5))
        store.create_run(_spec("r1"), ALL)
        claimed = store.claim("r1", 0, "w")
        outcomes = _sent(claimed)
        cut: list[int] = []

        def cut_the_connection_after_the_update(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
            if statement.startswith("UPDATE deliveries") and not cut:
                pid = conn.connection.driver_connection.info.backend_pid
                with killer.begin() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                cut.append(pid)

        event.listen(store.engine, "after_cursor_execute", cut_the_connection_after_the_update)
        with pytest.raises(StoreError):
            store.record(outcomes)
        assert cut, "the results were not written by one UPDATE"
        assert store.counts("r1") == {"sending": 5}  # nothing of the cut transaction stayed
        store.record(outcomes)
        assert store.counts("r1") == {"sent": 5}
        assert all(len(store.attempts_for(c.id)) == 1 for c in claimed)
    finally:
        store.close()
        killer.dispose()


def test_a_pooled_connection_the_server_dropped_while_it_lay_idle_is_replaced_before_use(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # connections are pinged on their way out of the pool only after lying unused a while (a ping before
    # every transaction was a round trip in three); one dropped by a restart meanwhile is then replaced
    # unseen, while one in steady use fails once, and the pool replaces every connection made before it
    from dispatcher.errors import StoreError
    from dispatcher.store import sql

    name = f"idle-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={name}")
    killer = sa.create_engine(postgres_url.split("?")[0])

    def drop_every_connection() -> None:
        with killer.begin() as conn:
            ended = conn.execute(
                sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": name},
            ).scalar_one()
        assert ended >= 1

    try:
        monkeypatch.setattr(sql, "IDLE_BEFORE_PING", 0.2)
        store.upsert_residents(_residents(3))
        store.create_run(_spec("r1"), ALL)
        drop_every_connection()
        time.sleep(0.3)
        assert store.control.run_status("r1") == "running"  # a lone statement, outside a transaction
        assert store.counts("r1") == {"pending": 3}  # a read in a transaction
        assert store.claim("r1", 0, "w")  # a write
        monkeypatch.setattr(sql, "IDLE_BEFORE_PING", 3600.0)
        drop_every_connection()
        with pytest.raises(StoreError):
            store.control.run_status("r1")
        assert store.control.run_status("r1") == "running"
        assert store.counts("r1") == {"sending": 3}
    finally:
        store.close()
        killer.dispose()


def test_rows_of_a_dead_worker_are_orphans_and_live_workers_keep_theirs(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(20))
    store.create_run(_spec("r1"), ALL)
    store.heartbeat("alive", "h", 1)
    store.claim("r1", 0, "alive")
    dead = store.claim("r1", 1, "dead")
    orphans = store.orphans("r1", stale_after_seconds=10)
    assert {o.id for o in orphans} == {c.id for c in dead}
    assert store.requeue(orphans) == len(dead)
    assert store.counts("r1") == {"pending": 10, "sending": 9, "skipped": 1}


def _leased_batch(store, worker: str = "w") -> list[Claimed]:  # type: ignore[no-untyped-def]
    """Run r1 over 20 residents (two batches of 10, one opted out in batch 0), batch 0 claimed by ``worker``."""
    store.upsert_residents(_residents(20))
    store.create_run(_spec("r1"), ALL)
    return list(store.claim("r1", 0, worker))


def _assert_verifies(store) -> None:  # type: ignore[no-untyped-def]
    _, problem = store.audit.verify_run("r1")
    assert problem is None, str(problem)


def _table_states(store, run_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Rows per state as the deliveries table itself holds them (``counts`` adds live leases' rows)."""
    d = t.deliveries
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.state, sa.func.count()).where(d.c.run_id == run_id).group_by(d.c.state))
        return {state: int(n) for state, n in rows}


def test_a_claim_leases_its_batch_and_writes_each_row_only_with_its_result(store) -> None:  # type: ignore[no-untyped-def]
    claimed = _leased_batch(store)
    # one lease row holds the batch; its rows are untouched in the table until their results come
    assert _table_states(store, "r1") == {"pending": 19, "skipped": 1}
    assert store.counts("r1") == {"pending": 10, "sending": 9, "skipped": 1}
    assert store.control.progress("r1").sending == 9 and store.control.progress("r1").due == 10
    assert store.sending_holders("r1") == {"w": 9}
    # the ledger says the claim took them: in flight, the table and the chain still agree
    _assert_verifies(store)
    store.record(_sent(claimed), actor="w")
    rows = {r.id: r for r in store.deliveries("r1")}
    assert all(rows[c.id].state == "sent" and rows[c.id].attempts == 1 for c in claimed)
    # the row keeps the claim it was sent under, as a row claimed by an UPDATE did
    assert {(rows[c.id].claim_token, rows[c.id].claimed_by) for c in claimed} == {(claimed[0].claim_token, "w")}
    assert store.counts("r1") == {"pending": 10, "sent": 9, "skipped": 1}
    assert store.claim("r1", 0, "w2") == []  # the batch is done, and no lease is left to hold it
    _assert_verifies(store)


def test_a_row_moved_behind_a_live_lease_is_still_caught_by_verify(store) -> None:  # type: ignore[no-untyped-def]
    claimed = _leased_batch(store)
    # a row of the lease set to sent in the table without its result's event
    with store.engine.begin() as conn:
        d = t.deliveries
        conn.execute(sa.update(d).where(d.c.id == claimed[0].id).values(state="sent"))
    _, problem = store.audit.verify_run("r1")
    assert problem is not None and f"delivery {claimed[0].id} is 'sent'" in str(problem), str(problem)


def test_a_dead_workers_lease_becomes_its_rows_in_sending_under_the_same_claim(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(20))
    store.create_run(_spec("r1"), ALL)
    claimed = store.claim("r1", 0, "dead")  # never registered: dead as soon as anyone looks
    orphans = store.orphans("r1", stale_after_seconds=10)
    assert sorted(o.id for o in orphans) == sorted(c.id for c in claimed)
    assert {o.claim_token for o in orphans} == {claimed[0].claim_token}
    # as the claim's UPDATE used to leave them: in sending, attempt counted, under the lease's token
    assert _table_states(store, "r1") == {"pending": 10, "sending": 9, "skipped": 1}
    assert all(r.attempts == 1 for r in store.deliveries("r1") if r.state == "sending")
    assert store.still_claimed([c.id for c in claimed], claimed[0].claim_token) == {c.id for c in claimed}
    # the worker was only cut off: back, its results are written from sending, once
    store.record(_sent(claimed), actor="dead")
    assert store.counts("r1") == {"pending": 10, "sent": 9, "skipped": 1}
    assert all(len(store.attempts_for(c.id)) == 1 for c in claimed)
    _assert_verifies(store)


def test_a_renewed_lease_is_not_taken_over_by_a_look_from_before_the_renewal(store) -> None:  # type: ignore[no-untyped-def]
    from dispatcher.store import _leases as leases

    claimed = _leased_batch(store)
    token = claimed[0].claim_token
    with store.engine.connect() as conn:
        seen = leases.held(conn, token)
    assert seen is not None
    later = datetime.now(UTC) + timedelta(seconds=5)
    store.clock = lambda: later  # type: ignore[method-assign]
    assert store.renew_claim("r1", token) == {c.id for c in claimed}
    with store.engine.begin() as conn:
        assert leases.materialize(conn, seen, later) == 0  # fenced on the claimed_at it read
    assert _table_states(store, "r1") == {"pending": 19, "skipped": 1}
    assert store.still_claimed([c.id for c in claimed], token) == {c.id for c in claimed}


def test_a_cancel_takes_live_leases_and_the_worker_cancels_what_it_had_not_handed_over(store) -> None:  # type: ignore[no-untyped-def]
    claimed = _leased_batch(store)
    cancelled = store.cancel_open("r1")
    assert cancelled == 10  # the other batch's rows; the leased ones are the worker's to settle
    assert _table_states(store, "r1") == {"cancelled": 10, "sending": 9, "skipped": 1}
    # the worker handed over four before it saw the cancel: those are recorded, the rest cancelled
    store.record(_sent(claimed[:4]), actor="w")
    store.control.cancel_claimed([c.id for c in claimed[4:]], actor="w", token=claimed[0].claim_token)
    assert store.counts("r1") == {"cancelled": 15, "sent": 4, "skipped": 1}
    assert store.claim("r1", 1, "w2") == []  # a cancelled run gives no new lease
    _assert_verifies(store)


def test_a_batch_stopped_part_way_records_what_left_and_releases_the_rest_uncounted(store) -> None:  # type: ignore[no-untyped-def]
    claimed = _leased_batch(store)
    store.record(_sent(claimed[:3]), actor="w")
    assert store.release([c.id for c in claimed[3:]], claimed[0].claim_token) == 6
    rows = {r.id: r for r in store.deliveries("r1")}
    assert [rows[c.id].state for c in claimed] == ["sent"] * 3 + ["pending"] * 6
    assert [rows[c.id].attempts for c in claimed] == [1] * 3 + [0] * 6  # a release does not count an attempt
    again = store.claim("r1", 0, "w2")
    assert sorted(c.id for c in again) == sorted(c.id for c in claimed[3:])
    _assert_verifies(store)


def test_duplicate_fire_of_the_same_campaign_creates_nothing(store) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    store.upsert_residents(_residents(5))
    fire = datetime(2021, 1, 5, 2, 0, tzinfo=UTC)
    store.create_run(_spec("r1", fire_time=fire), ALL)
    with pytest.raises(DuplicateRun):
        store.create_run(_spec("r2", fire_time=fire), ALL)
    assert [r.id for r in store.list_runs()] == ["r1"]
    assert store.counts("r2") == {}


def test_idempotency_key_is_unique_in_the_database(store) -> None:  # type: ignore[no-untyped-def]
    store.upsert_residents(_residents(3))
    store.create_run(_spec("r1"), ALL)
    row = next(store.deliveries("r1"))
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.insert(t.deliveries).values({k: v for k, v in dataclasses.asdict(row).items() if k != "id"}))


def test_a_number_outside_the_registry_is_held_once_per_run_and_a_resident_once(store) -> None:  # type: ignore[no-untyped-def]
    from dispatcher.store.base import DirectRecipient

    store.upsert_residents(_residents(3))
    store.create_run(_spec("r1"), ALL)
    resident = next(store.deliveries("r1"))
    from datetime import UTC, datetime

    from dispatcher.store._rows import insert_direct_run

    with store.engine.begin() as conn:  # an alert's run: numbers from a list, one outside the registry
        number = DirectRecipient("+8613912345678")
        insert_direct_run(conn, _spec("r2"), [number, number], datetime.now(UTC), is_sqlite=store.is_sqlite)
    assert [row.phone for row in store.deliveries("r2")] == ["+8613912345678"]  # a repeated number: one row
    direct = next(store.deliveries("r2"))

    def again(row, **changes):  # type: ignore[no-untyped-def]
        values = {k: v for k, v in dataclasses.asdict(row).items() if k != "id"}
        with store.engine.begin() as conn:
            conn.execute(sa.insert(t.deliveries).values({**values, **changes}))

    with pytest.raises(sa.exc.IntegrityError):
        again(direct)  # the same number outside the registry, again in its run
    with pytest.raises(sa.exc.IntegrityError):
        again(resident)  # the same resident, again in its run
    again(direct, run_id="r3", key="r3:+8613912345678")  # in another run: a row of its own
    assert store.counts("r3") == {"pending": 1}


def test_a_numbers_rows_are_found_by_phone_whether_it_is_in_the_registry_or_not(store) -> None:  # type: ignore[no-untyped-def]
    # an auditor's search by number and a delivery's trace find rows by phone: PostgreSQL through the
    # resident (a registered number) or the key of a row outside the registry, SQLite through every key
    from datetime import UTC, datetime

    from dispatcher.audit import LogFilter
    from dispatcher.store._rows import insert_direct_run
    from dispatcher.store.base import DirectRecipient

    store.upsert_residents(_residents(3))
    store.create_run(_spec("r1"), ALL)
    resident = next(store.deliveries("r1"))
    outside = "+8613912345678"
    with store.engine.begin() as conn:  # an alert's run: a number outside the registry, and a resident's
        recipients = [DirectRecipient(outside), DirectRecipient(resident.phone)]
        insert_direct_run(conn, _spec("r2"), recipients, datetime.now(UTC), is_sqlite=store.is_sqlite)
    for run_id in ("r1", "r2"):
        store.record(_sent(store.claim(run_id, 0, "w1")), actor="w1")

    def traced(run_id: str, phone: str) -> tuple[str, str] | None:
        found = store.traces.delivery(run_id, phone=phone)
        return None if found is None else (found.row.run_id, found.row.phone)

    def searched(phone: str) -> list[tuple[str, str]]:
        return [(e["run_id"], e["phone"]) for e in store.audit.events(LogFilter.parse(phone=phone))]

    assert traced("r1", resident.phone) == ("r1", resident.phone)
    assert traced("r2", resident.phone) == ("r2", resident.phone)
    assert traced("r2", outside) == ("r2", outside)
    assert traced("r1", outside) is None and traced("r2", "+8613800000099") is None
    assert searched(resident.phone) == [("r1", resident.phone), ("r2", resident.phone)]
    assert searched(outside) == [("r2", outside)]
    # registered after the run that holds it: the row still says resident 0, and is still found
    store.upsert_residents([dataclasses.replace(_residents(1)[0], phone=outside)])
    assert traced("r2", outside) == ("r2", outside)
    assert searched(outside) == [("r2", outside)]


def test_commands_starting_together_on_a_fresh_database_all_find_one_schema(database_url: str) -> None:
    # `honcho start` on a new database starts the web, the workers and the scheduler at once, and each
    # creates the schema if it is missing. The second here looks for the tables while the first has
    # made them but not yet committed, and creates them after the first commits: PostgreSQL refused
    # that ("relation/type ... already exists") until creation waited its turn on an advisory lock
    import threading

    from sqlalchemy import event

    first, second = open_store(database_url, migrate=False), open_store(database_url, migrate=False)
    first_holding, second_creating, first_committed = threading.Event(), threading.Event(), threading.Event()

    def first_holds_its_tables_uncommitted(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith("INSERT INTO dispatch_meta"):
            # gives the second up to 3 s to reach its own CREATE TABLE (it never does when it waits its turn)
            first_holding.set()
            second_creating.wait(timeout=3)

    def second_creates_after_the_first_commits(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().startswith("CREATE TABLE") and not second_creating.is_set():
            second_creating.set()
            first_committed.wait(timeout=10)

    event.listen(first.engine, "before_cursor_execute", first_holds_its_tables_uncommitted)
    event.listen(second.engine, "before_cursor_execute", second_creates_after_the_first_commits)
    failures: list[BaseException] = []

    def start_second() -> None:
        try:
            second.migrate()
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    try:
        migrating = threading.Thread(target=start_second)
        first_in_write = threading.Thread(target=lambda: (first.migrate(), first_committed.set()))
        first_in_write.start()
        assert first_holding.wait(timeout=30), "the first never reached the end of its creating transaction"
        migrating.start()
        first_in_write.join(timeout=30)
        migrating.join(timeout=30)
        assert failures == []
        assert first.schema_version() == second.schema_version() == t.SCHEMA_VERSION
    finally:
        first_committed.set()
        first.close()
        second.close()


def _key_collations(engine: sa.Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        return {
            table: conn.execute(
                sa.text(
                    "SELECT collation_name FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND table_name = :t AND column_name = 'key'"
                ),
                {"t": table},
            ).scalar_one()
            for table in ("deliveries", "events")
        }


def test_a_version_11_delivery_log_trades_its_two_run_indexes_for_one_and_its_runs_still_send(store) -> None:  # type: ignore[no-untyped-def]
    # version 11 kept (run, batch, state) and (run, state) on deliveries; one (run, state, batch) serves
    # every query the two did, and each delivery row written or updated paid for both. On PostgreSQL its
    # keys were compared under the database's locale, and are compared byte by byte now
    store.upsert_residents(_residents(30))
    store.create_run(_spec("r1"), ALL)
    with store.engine.begin() as conn:  # what a version 11 program left
        conn.execute(sa.text("DROP INDEX ix_deliveries_run_state_batch"))
        conn.execute(sa.text("CREATE INDEX ix_deliveries_run_batch_state ON deliveries (run_id, batch_no, state)"))
        conn.execute(sa.text("CREATE INDEX ix_deliveries_run_state ON deliveries (run_id, state)"))
        if not store.is_sqlite:
            for table in ("deliveries", "events"):
                conn.execute(sa.text(f'ALTER TABLE {table} ALTER COLUMN key TYPE VARCHAR(64) COLLATE "default"'))
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '11' WHERE key = 'schema_version'"))
    if not store.is_sqlite:
        assert _key_collations(store.engine) == {"deliveries": None, "events": None}
    upgraded = open_store(store.url)
    try:
        assert upgraded.schema_version() == t.SCHEMA_VERSION
        if not upgraded.is_sqlite:
            assert _key_collations(upgraded.engine) == {"deliveries": "C", "events": "C"}
        with upgraded.engine.connect() as conn:
            indexes = {i["name"]: i["column_names"] for i in sa.inspect(conn).get_indexes("deliveries")}
        assert indexes["ix_deliveries_run_state_batch"] == ["run_id", "state", "batch_no"]
        assert "ix_deliveries_run_batch_state" not in indexes and "ix_deliveries_run_state" not in indexes
        assert upgraded.pending_batches("r1") == [0, 1, 2]
        assert len(upgraded.claim("r1", 1, "w1")) == 10
        assert len(upgraded.claim("r1", 1, "w2")) == 0  # claimed once
    finally:
        upgraded.close()


def _delivery_id_cache(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT cache_size FROM pg_sequences WHERE schemaname = current_schema() "
                    "AND sequencename = 'deliveries_id_seq'"
                )
            ).scalar_one()
        )


def test_postgres_numbers_and_indexes_deliveries_for_fast_writes_on_a_new_log_and_after_an_upgrade(
    postgres_url: str,
) -> None:
    store = open_store(postgres_url)
    try:
        _numbers_and_indexes_after_an_upgrade(store)
    finally:
        store.close()


def _numbers_and_indexes_after_an_upgrade(store) -> None:  # type: ignore[no-untyped-def]
    assert _delivery_id_cache(store.engine) == t.DELIVERY_ID_CACHE == 1000
    assert "ix_deliveries_key" not in _index_names(store.engine)
    store.upsert_residents(_residents(30))
    store.create_run(_spec("r1"), ALL)
    with store.engine.begin() as conn:  # what a version 13 program left
        conn.execute(sa.text("ALTER SEQUENCE deliveries_id_seq CACHE 1"))
        for index in ("uq_deliveries_resident_run", "uq_deliveries_unlisted_key"):
            conn.execute(sa.text(f"DROP INDEX {index}"))
        conn.execute(sa.text("ALTER TABLE deliveries ADD CONSTRAINT deliveries_key_key UNIQUE (key)"))
        conn.execute(sa.text("CREATE INDEX ix_deliveries_resident ON deliveries (resident_id)"))
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '13' WHERE key = 'schema_version'"))
    upgraded = open_store(store.url)
    try:
        assert _delivery_id_cache(upgraded.engine) == 1000
        with upgraded.engine.connect() as conn:
            constraints = {c["name"] for c in sa.inspect(conn).get_unique_constraints("deliveries")}
        indexes = _index_names(upgraded.engine)
        # the key's unique B-tree and the resident index give way to the two unique indexes that keep each
        # number to one row per run; no index over every key is left
        assert {"uq_deliveries_resident_run", "uq_deliveries_unlisted_key"} <= indexes
        assert "ix_deliveries_resident" not in indexes and "deliveries_key_key" not in constraints
        assert "ix_deliveries_key" not in indexes
        # a run written after the upgrade is numbered in selection order, after the one before it
        upgraded.create_run(_spec("r2"), ALL)
        with upgraded.engine.connect() as conn:
            query = sa.text("SELECT id FROM deliveries WHERE run_id = :r ORDER BY resident_id")
            ids = {run: [row.id for row in conn.execute(query, {"r": run})] for run in ("r1", "r2")}
        assert ids["r2"] == sorted(ids["r2"]) and min(ids["r2"]) > max(ids["r1"])
        assert upgraded.claim("r2", 0, "w1") and not upgraded.claim("r2", 0, "w2")  # claimed once
    finally:
        upgraded.close()
    with store.engine.begin() as conn:  # what a version 14 program left: a hash index over the keys
        conn.execute(sa.text("CREATE INDEX ix_deliveries_key ON deliveries USING hash (key)"))
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '14' WHERE key = 'schema_version'"))
    upgraded = open_store(store.url)
    try:
        assert upgraded.schema_version() == t.SCHEMA_VERSION
        assert "ix_deliveries_key" not in _index_names(upgraded.engine)
    finally:
        upgraded.close()


def _index_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return {i["name"] for i in sa.inspect(conn).get_indexes("deliveries")}


def test_sqlite_store_uses_wal(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_sqlite_writes_reach_the_database_file_without_waiting_for_a_thousand_pages_of_log(tmp_path: Path) -> None:
    """A commit leaves the checkpoint to the writer once its turn is over (a commit that ran it held every
    other writer up): after a few writes what they wrote is in the database file itself, not only in the
    write-ahead log, which SQLite would have copied over only past 1,000 pages."""
    import shutil
    import sqlite3

    from dispatcher.store._db import CHECKPOINT_EVERY, WAL_AUTOCHECKPOINT

    path = tmp_path / "x.db"
    s = open_store(f"sqlite:///{path}")
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == WAL_AUTOCHECKPOINT
        writes = 2 * CHECKPOINT_EVERY
        residents = _residents(writes * 10)
        for i in range(writes):
            s.upsert_residents(residents[i * 10 : (i + 1) * 10])
        # the database file alone, as a copy that left the log behind would have it: at most the last
        # CHECKPOINT_EVERY writes are only in the log
        shutil.copy(path, tmp_path / "file-only.db")
        copy = sqlite3.connect(tmp_path / "file-only.db")
        try:
            in_file = copy.execute("SELECT count(*) FROM residents").fetchone()[0]
            assert len(residents) - CHECKPOINT_EVERY * 10 <= in_file <= len(residents)
        finally:
            copy.close()
    finally:
        s.close()


def test_an_operator_lock_keeps_a_second_holder_out_until_it_is_released(database_url: str) -> None:
    # on SQLite the lock is a flock on a file beside the database, on PostgreSQL an advisory lock:
    # either way a second command working on the same campaign waits, then says who is in the way
    from dispatcher.errors import StoreError

    first, second = open_store(database_url), open_store(database_url)
    try:
        with first.coordination.operator_lock("campaign:c1"):
            busy = pytest.raises(StoreError, match="another dispatch command is working on campaign:c1")
            with busy, second.coordination.operator_lock("campaign:c1", wait=0.3):
                pass
            with second.coordination.operator_lock("campaign:c2", wait=0.3):
                pass  # another campaign's lock is free
        with second.coordination.operator_lock("campaign:c1", wait=0.3):
            pass  # released with the first holder
    finally:
        first.close()
        second.close()


def test_a_large_run_on_postgresql_refreshes_the_planners_statistics_of_its_rows(postgres_url: str) -> None:
    """Until the table is analyzed the planner does not know a fan-out's rows, and the frequency cap's query
    per batch scanned them all in parallel: a run of 10,000 rows or more ends with ANALYZE deliveries."""
    import time

    store = open_store(postgres_url)
    n = store.ANALYZE_AFTER_ROWS
    for start in range(0, n, 2000):
        store.upsert_residents(_residents(n)[start : start + 2000])

    def analyzed() -> object:
        with store.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT greatest(last_analyze, last_autoanalyze) FROM pg_stat_user_tables "
                    "WHERE relname = 'deliveries' AND schemaname = current_schema()"
                )
            ).scalar()

    store.create_run(_spec("small", batch_size=500), AudienceFilter(districts=("henglin",)))
    before = analyzed()
    created = store.create_run(_spec("large", batch_size=500), ALL)
    assert created.total >= n
    deadline = time.monotonic() + 10  # statistics reach other sessions within a second or so
    while analyzed() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert analyzed() != before, "deliveries was not analyzed after a large run"
    store.close()


@pytest.fixture(scope="module")
def postgres_store(postgres_available: str):  # type: ignore[no-untyped-def]
    """One store on a schema of its own for a whole property test (Hypothesis runs it many times)."""
    import uuid

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(postgres_available)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in postgres_available else "?"
    s = open_store(f"{postgres_available}{sep}options=-csearch_path%3D{schema}")
    yield s
    s.close()
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.one_of(st.none(), st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))),
        min_size=16,
        max_size=40,
    )
)
def test_a_batch_of_attempts_reads_back_exactly_as_written_whatever_the_text(postgres_store, texts) -> None:  # type: ignore[no-untyped-def]
    # a batch's rows reach PostgreSQL as arrays written out as text (quotes, backslashes, braces, commas,
    # NULL, the word "NULL" and blanks included): each value must come back as it went in, in order
    from dispatcher.store._bulk import insert_rows

    at = datetime(2026, 11, 30, 10, 0, 0, 123456, tzinfo=UTC)
    common = {"run_id": "r-arrays", "attempt": 1, "gateway": "outbox", "outcome": "failed", "trace": None, "at": at}
    rows = [
        {
            **common,
            "delivery_id": 10_000 + i,
            "provider_id": None if text is None else text[:64],
            "error_code": "NULL" if i % 3 == 0 else None,
            "error_message": text,
        }
        for i, text in enumerate(texts)
    ]
    a = t.attempts
    with postgres_store.engine.begin() as conn:
        conn.execute(sa.delete(a).where(a.c.run_id == "r-arrays"))
        insert_rows(conn, a, rows)
        back = conn.execute(
            sa.select(a.c.delivery_id, a.c.provider_id, a.c.error_code, a.c.error_message, a.c.at)
            .where(a.c.run_id == "r-arrays")
            .order_by(a.c.id)
        ).all()
    assert [tuple(b) for b in back] == [
        (r["delivery_id"], r["provider_id"], r["error_code"], r["error_message"], at) for r in rows
    ]
