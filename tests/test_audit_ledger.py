"""`dispatch audit verify` against a real run, then against the events table tampered with raw SQL.

Each tamper is a single-row change made directly in the database (SQLite and
PostgreSQL), the way someone with database access would cover their tracks:
edit a field, delete a row, swap two rows. Verify must fail (exit 1) and name the
event; after the row is put back it must pass again, so each check really is
about that one row.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from dispatcher import audit

# 2021-02-15 10:00 in Changzhou: inside the send window and inside 2021Q1
FAKE_NOW = "2021-02-15T10:00:00+08:00"

THREE_DISTRICTS = """\
id: ledger-test
title: 冒充客服退款诈骗预警（测试）
owner: 公安分局
channel: sms
template: themes/refund.sms.j2
variables:
  hotline: "96110"
audience:
  districts: [lucheng, dingyan, qishuyan]
"""


def run_campaign(project: Any, size: int = 300, **env: str) -> str:
    project.registry(size, seed=7)
    project.write("campaigns/ledger-test.yaml", THREE_DISTRICTS)
    result = project.dispatch("run", "campaigns/ledger-test.yaml", "--json", env={"DISPATCH_FAKE_NOW": FAKE_NOW, **env})
    assert result.returncode == 0, result.stderr
    runs = project.dispatch("runs", "--json")
    return json.loads(runs.stdout)["runs"][0]["run_id"]


def engine_of(project: Any) -> sa.Engine:
    return sa.create_engine(project.env["DISPATCH_DATABASE_URL"])


def event_rows(engine: sa.Engine, run_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(
                sa.text("SELECT * FROM events WHERE run_id = :r ORDER BY id"), {"r": run_id}
            ).mappings()
        ]


def verify_cli(project: Any, *args: str) -> Any:
    return project.dispatch("audit", "verify", *args)


def _set(conn: Any, event_id: int, values: dict[str, Any]) -> None:
    cols = ", ".join(f"{k} = :{k}" for k in values)
    conn.execute(sa.text(f"UPDATE events SET {cols} WHERE id = :_id"), {**values, "_id": event_id})


def _insert(conn: Any, row: dict[str, Any]) -> None:
    cols = ", ".join(row)
    conn.execute(sa.text(f"INSERT INTO events ({cols}) VALUES ({', '.join(':' + k for k in row)})"), row)


def _swap(conn: Any, a: dict[str, Any], b: dict[str, Any]) -> None:
    """Exchange every column but the id (seq moved aside first: (run_id, seq) is unique)."""
    body = {k: v for k, v in a.items() if k != "id"}
    other = {k: v for k, v in b.items() if k != "id"}
    _set(conn, a["id"], {"seq": -1})
    _set(conn, b["id"], body)
    _set(conn, a["id"], other)


def _a_second_later(at: Any) -> Any:
    """An event's time one second on, in the form the database handed it out (SQLite: text)."""
    from datetime import datetime, timedelta

    if isinstance(at, str):
        return str(datetime.fromisoformat(at) + timedelta(seconds=1))
    return at + timedelta(seconds=1)


def _restore(conn: Any, *rows: dict[str, Any]) -> None:
    for i, row in enumerate(rows):
        _set(conn, row["id"], {"seq": -1 - i})
    for row in rows:
        _set(conn, row["id"], {k: v for k, v in row.items() if k != "id"})


def _without_first_row(payload: str) -> str:
    """A ``batch.recorded`` payload with its first row left out, in the ledger's own JSON form."""
    data = json.loads(payload)
    return json.dumps({**data, "rows": data["rows"][1:]}, ensure_ascii=False, sort_keys=True)


def chain_of(events: list[dict[str, Any]], batch: int | None) -> list[dict[str, Any]]:
    """One chain's events in id order: the run's own (``None``) or a batch's."""
    return [e for e in events if e["batch"] == batch]


def test_verify_names_the_event_after_any_single_row_is_edited_deleted_or_swapped(
    any_db_project: Any,
) -> None:
    run_id = run_campaign(any_db_project, DISPATCH_BATCH_SIZE="40")
    engine = engine_of(any_db_project)
    events = event_rows(engine, run_id)
    intact = verify_cli(any_db_project)
    assert intact.returncode == 0, intact.stderr
    # the head, then on each batch's chain its claim and its results (one event each, naming every row)
    assert events[0]["kind"] == "run.created" and len(events) >= 8
    assert f"ok {run_id}: {len(events)} events" in intact.stdout
    store = any_db_project.runtime().store
    # the run's own chain: its head, then the seal of the batch tails written when the run finished
    head, after_head = chain_of(events, None)[:2]
    assert after_head["kind"] == "batches.sealed"
    # a batch's chain: the worker's claim of its 40 rows, then its results for them
    batch = chain_of(events, 1)
    mid, nxt, last = batch[0], batch[1], batch[-1]
    assert (mid["kind"], nxt["kind"]) == ("batch.claimed", "batch.recorded"), batch
    assert len(json.loads(nxt["payload"])["rows"]) == len(json.loads(mid["payload"])["ids"]) == 40
    sent = nxt
    assert '"sent"' in sent["payload"]
    other = chain_of(events, 0)

    # (description, tamper, undo, the event id the message must name, a phrase it must contain)
    cases = [
        (
            "edit one row's state in a batch's results",
            lambda c: _set(c, sent["id"], {"payload": sent["payload"].replace('"sent"', '"failed"', 1)}),
            lambda c: _set(c, sent["id"], {"payload": sent["payload"]}),
            sent["id"],
            "edited",
        ),
        (
            "drop a row from a batch's results",
            lambda c: _set(c, sent["id"], {"payload": _without_first_row(sent["payload"])}),
            lambda c: _set(c, sent["id"], {"payload": sent["payload"]}),
            sent["id"],
            "edited",
        ),
        (
            "edit the time",
            lambda c: _set(c, mid["id"], {"at": _a_second_later(mid["at"])}),
            lambda c: _set(c, mid["id"], {"at": mid["at"]}),
            mid["id"],
            "edited",
        ),
        (
            "edit the head's snapshot hashes",
            lambda c: _set(c, head["id"], {"payload": head["payload"].replace("keys_sha256", "keys_sha25x")}),
            lambda c: _set(c, head["id"], {"payload": head["payload"]}),
            head["id"],
            "edited",
        ),
        (
            "edit a hash to hide an edit",
            lambda c: _set(c, mid["id"], {"hash": "f" * 64}),
            lambda c: _set(c, mid["id"], {"hash": mid["hash"]}),
            mid["id"],
            "hash",
        ),
        (
            "delete a middle event",
            lambda c: c.execute(sa.text("DELETE FROM events WHERE id = :i"), {"i": mid["id"]}),
            lambda c: _insert(c, mid),
            nxt["id"],
            f"chain {run_id}/1, seq {nxt['seq']}): expected seq {mid['seq']}",
        ),
        (
            # linked onto the end of batch 0's chain (where its id falls among that chain's events
            # when workers interleaved the batches, out of place; at the end, its hash is of chain 1)
            "move an event onto the end of another batch's chain",
            lambda c: _set(c, mid["id"], {"batch": 0, "seq": len(other), "prev_hash": other[-1]["hash"]}),
            lambda c: _set(c, mid["id"], {"batch": 1, "seq": mid["seq"], "prev_hash": mid["prev_hash"]}),
            mid["id"],
            f"(chain {run_id}/0, seq {len(other)}): ",
        ),
        (
            "delete the head",
            lambda c: c.execute(sa.text("DELETE FROM events WHERE id = :i"), {"i": head["id"]}),
            lambda c: _insert(c, head),
            after_head["id"],
            "expected seq 0",
        ),
        (
            "swap two events",
            lambda c: _swap(c, mid, nxt),
            lambda c: _restore(c, mid, nxt),
            mid["id"],
            f"expected seq {mid['seq']} here but found seq {nxt['seq']}",
        ),
    ]
    for name, tamper, undo, event_id, phrase in cases:
        with engine.begin() as conn:
            tamper(conn)
        result = verify_cli(any_db_project)
        assert result.returncode == 1, f"{name}: verify passed on a tampered ledger"
        assert f"event {event_id} " in result.stderr and phrase in result.stderr, f"{name}: {result.stderr}"
        with engine.begin() as conn:
            undo(conn)
        # in-process for speed: the CLI's verdict was checked just above
        restored = [r.problem for r in audit.verify(store)]
        assert restored == [None, None], f"{name}: undo did not restore the ledger: {restored}"

    # the last event has no successor to trip over: the recorded tail names it by chain and seq
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events WHERE id = :i"), {"i": last["id"]})
    result = verify_cli(any_db_project)
    assert result.returncode == 1
    assert f"chain {run_id}/1 at seq {last['seq']}" in result.stderr and "missing" in result.stderr, result.stderr


def tails(engine: sa.Engine, run_id: str) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM ledger_tails WHERE run_id = :r"), {"r": run_id}).mappings()
        return {int(r["batch"]): dict(r) for r in rows}


def test_verify_catches_a_batch_chain_cut_short_behind_a_rewritten_tail_or_deleted_whole(any_db_project: Any) -> None:
    run_id = run_campaign(any_db_project, DISPATCH_BATCH_SIZE="40")
    engine = engine_of(any_db_project)
    events = event_rows(engine, run_id)
    batches = sorted({e["batch"] for e in events if e["batch"] is not None})
    assert len(batches) >= 3, batches
    assert set(tails(engine, run_id)) == set(batches)
    chain = chain_of(events, 2)
    last, before = chain[-1], chain[-2]

    # cut the last event off and make the tail row agree: only the seal written at the finish knows
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events WHERE id = :i"), {"i": last["id"]})
        conn.execute(
            sa.text("UPDATE ledger_tails SET ledger_seq = :s, ledger_hash = :h WHERE run_id = :r AND batch = 2"),
            {"s": before["seq"], "h": before["hash"], "r": run_id},
        )
    result = verify_cli(any_db_project, run_id)
    assert result.returncode == 1
    assert f"chain {run_id}/2 at seq {last['seq']}: the chain ends before seq {last['seq']}" in result.stderr, (
        result.stderr
    )
    with engine.begin() as conn:
        _insert(conn, last)
        conn.execute(
            sa.text("UPDATE ledger_tails SET ledger_seq = :s, ledger_hash = :h WHERE run_id = :r AND batch = 2"),
            {"s": last["seq"], "h": last["hash"], "r": run_id},
        )
    assert verify_cli(any_db_project, run_id).returncode == 0

    # a whole batch chain gone, events and tail: the head sealed how many there are
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events WHERE run_id = :r AND batch = 1"), {"r": run_id})
        conn.execute(sa.text("DELETE FROM ledger_tails WHERE run_id = :r AND batch = 1"), {"r": run_id})
    result = verify_cli(any_db_project, run_id)
    assert result.returncode == 1
    assert f"chain {run_id}/1: the batch chain sealed in the head has no tail" in result.stderr, result.stderr

    # and the run row cannot be made to claim fewer chains than its head sealed
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET batch_chains = 1 WHERE id = :r"), {"r": run_id})
    result = verify_cli(any_db_project, run_id)
    assert result.returncode == 1
    assert "batch chains but the run row says 1" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_run_recorded_by_several_worker_processes_at_once_verifies(database_url: str) -> None:
    """Four processes claim and record the same run's batches at once (each tries every batch, from a
    different one first, so some race for a batch): every event lands in its batch's chain, intact."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from dispatcher.store import open_store

    root = Path(__file__).resolve().parent.parent
    script = root / "bench" / "bench_ledger.py"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    run_id = "ledger-concurrent"
    made = subprocess.run(
        [sys.executable, str(script), "setup", "--url", database_url, "--run-id", run_id,
         "--batches", "12", "--batch-size", "40"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    pending = int(made.stdout)
    start_at = time.time() + 2
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                "worker",
                "--url",
                database_url,
                "--run-id",
                run_id,
                "--worker-id",
                f"w{i}",
                "--start-at",
                str(start_at),
                "--batches",
                ",".join(str((i * 3 + b) % 12) for b in range(12)),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    recorded = 0
    for proc in workers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        recorded += json.loads(out.strip().splitlines()[-1])["rows"]
    assert recorded == pending == 480
    store = open_store(database_url, migrate=False)
    try:
        assert store.counts(run_id) == {"sent": 480}
        assert store.get_run(run_id).status == "completed"
        events, problem = store.audit.verify_run(run_id)
        assert problem is None, str(problem)
        # head, one claim per batch (each batch sent in one go), a result per row, and one seal of the
        # 12 batch tails when the run finished
        assert events == 1 + 12 + 480 + 1
        with store.engine.connect() as conn:
            per_chain = dict(
                conn.execute(
                    sa.text("SELECT batch, count(*) FROM events WHERE run_id = :r GROUP BY batch"), {"r": run_id}
                ).all()
            )
        # each batch chain: its claim and its 40 results
        assert per_chain == {None: 2, **{b: 41 for b in range(12)}}
    finally:
        store.close()


def _as_version_9(engine: sa.Engine, run_id: str) -> None:
    """Turn a delivery log into what version 9 wrote: one chain per run, no batch column, no tails.

    The run's events are chained again as version 9 chained them (one chain, in id order, the same
    hash function over the run's id), without the seal and the head's count of batch chains.
    """
    from datetime import UTC

    from dispatcher.store import ledger
    from dispatcher.store import schema as t

    md = sa.MetaData()
    v9_events = sa.Table(
        "events", md, *[c._copy() for c in t.events.columns if c.name != "batch"],
        sa.UniqueConstraint("run_id", "seq", name="uq_events_run_seq"),
        sa.Index("ix_events_key", "key"), sa.Index("ix_events_at", "at"),
    )  # fmt: skip
    with engine.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(t.events).order_by(t.events.c.id)).mappings()]
        conn.execute(sa.text("DROP TABLE events"))
        conn.execute(sa.text("DROP TABLE ledger_tails"))
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN batch_chains"))
        v9_events.create(conn)
        seq, prev = -1, ledger.GENESIS
        kept = []
        for row in rows:
            row.pop("batch")
            if row["run_id"] == run_id:
                if row["kind"] == "batches.sealed":
                    continue
                seq += 1
                if seq == 0:
                    payload = json.loads(row["payload"])
                    del payload["batch_chains"]
                    row["payload"] = json.dumps(payload, ensure_ascii=False, sort_keys=True)
                at = row["at"] if row["at"].tzinfo else row["at"].replace(tzinfo=UTC)
                row.update(seq=seq, prev_hash=prev, hash=ledger.event_hash(prev, run_id, seq, at, row))
                prev = row["hash"]
            kept.append(row)
        conn.execute(sa.insert(v9_events), kept)
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('events', 'id'), (SELECT max(id) FROM events))"))
        conn.execute(
            sa.text("UPDATE runs SET ledger_seq = :s, ledger_hash = :h WHERE id = :r"),
            {"s": seq, "h": prev, "r": run_id},
        )
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '9' WHERE key = 'schema_version'"))


def test_a_version_9_ledger_is_upgraded_in_place_and_its_runs_still_verify_and_grow(any_db_project: Any) -> None:
    from dispatcher.store import open_store
    from dispatcher.store import schema as t

    run_id = run_campaign(any_db_project, size=120, DISPATCH_BATCH_SIZE="20")
    engine = engine_of(any_db_project)
    _as_version_9(engine, run_id)
    url = any_db_project.env["DISPATCH_DATABASE_URL"]
    store = open_store(url)  # upgrades
    try:
        assert store.schema_version() == t.SCHEMA_VERSION == 15
        assert store.get_run(run_id).batch_chains is None
        assert [r.problem for r in audit.verify(store)] == [None, None]
        # a delivery report for the old run goes on its one chain, which still verifies
        with engine.connect() as conn:
            provider_id = conn.execute(
                sa.text("SELECT provider_id FROM deliveries WHERE run_id = :r AND state = 'sent' LIMIT 1"),
                {"r": run_id},
            ).scalar_one()
        assert [c.to_state for c in store.provider_events.apply_status(provider_id, "delivered")] == ["delivered"]
        with engine.connect() as conn:
            newest = conn.execute(
                sa.text("SELECT batch, kind, to_state FROM events WHERE run_id = :r ORDER BY id DESC LIMIT 1"),
                {"r": run_id},
            ).one()
        assert tuple(newest) == (None, "delivery.state", "delivered")
        assert [r.problem for r in audit.verify(store)] == [None, None]
    finally:
        store.close()
    # a run made after the upgrade gets batch chains beside the old one
    result = any_db_project.dispatch(
        "run", "campaigns/ledger-test.yaml", "--again", "--reason", "after the upgrade", "--json",
        env={"DISPATCH_FAKE_NOW": FAKE_NOW},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert verify_cli(any_db_project).returncode == 0


def test_verify_catches_delivery_rows_changed_behind_the_ledger(any_db_project: Any) -> None:
    run_id = run_campaign(any_db_project)
    engine = engine_of(any_db_project)
    with engine.begin() as conn:
        victim = conn.execute(
            sa.text("SELECT id, key FROM deliveries WHERE run_id = :r AND state = 'sent' ORDER BY id LIMIT 1"),
            {"r": run_id},
        ).one()
        conn.execute(sa.text("UPDATE deliveries SET state = 'failed' WHERE id = :i"), {"i": victim.id})
    result = verify_cli(any_db_project, run_id)
    assert result.returncode == 1
    assert f"delivery {victim.id} is 'failed'" in result.stderr and "last event says 'sent'" in result.stderr

    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE deliveries SET state = 'sent', phone = '+8613900000000' WHERE id = :i"),
            {"i": victim.id},
        )
    result = verify_cli(any_db_project, run_id)
    assert result.returncode == 1
    assert f"delivery {victim.id}: phone column differs from its key" in result.stderr, result.stderr

    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM deliveries WHERE id = :i"), {"i": victim.id})
    result = verify_cli(any_db_project, run_id)
    assert result.returncode == 1
    assert "does not match the keys and initial states sealed in the head" in result.stderr, result.stderr


def test_unmasked_export_is_recorded_in_the_audit_chain_and_covered_by_verify(project: Any) -> None:
    run_campaign(project, size=200)
    masked = project.dispatch("audit", "log", "--format", "jsonl", "--state", "sent", "--limit", "3")
    assert masked.returncode == 0, masked.stderr
    assert "****" in masked.stdout
    assert project.dispatch("audit", "exports", "--json").stdout.strip() == '{"exports": []}'

    unmasked = project.dispatch("audit", "log", "--format", "csv", "--district", "丁堰街道", "--unmask")
    assert unmasked.returncode == 0, unmasked.stderr
    assert "****" not in unmasked.stdout
    exports = json.loads(project.dispatch("audit", "exports", "--json").stdout)["exports"]
    assert len(exports) == 1
    assert exports[0]["kind"] == "audit.export"
    assert exports[0]["payload"]["filter"] == {"district": "dingyan"}
    assert exports[0]["payload"]["format"] == "csv"
    assert "@" in exports[0]["actor"]

    ok = project.dispatch("audit", "verify")
    assert ok.returncode == 0 and "ok audit: 1 events" in ok.stdout, ok.stdout + ok.stderr
    engine = engine_of(project)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE events SET actor = 'nobody' WHERE run_id = 'audit'"))
    bad = project.dispatch("audit", "verify")
    assert bad.returncode == 1
    assert "chain audit" in bad.stderr and "edited" in bad.stderr


def test_verify_of_an_unknown_run_is_bad_input(project: Any) -> None:
    project.registry(50, seed=1)
    result = project.dispatch("audit", "verify", "no-such-run")
    assert result.returncode == 2
    assert "no-such-run" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--phone", "12345"], "phone"),
        (["--district", "atlantis"], "unknown district"),
        (["--state", "lost"], "unknown state"),
        (["--since", "last tuesday"], "--since"),
        (["--format", "xml"], "--format"),
    ],
)
def test_audit_log_refuses_bad_filters_with_one_line(project: Any, args: list[str], needle: str) -> None:
    result = project.dispatch("audit", "log", *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_log_filter_describes_a_phone_search_without_the_number_or_a_reversible_hash() -> None:
    import hashlib

    f = audit.LogFilter.parse(phone="13800138000")
    described = f.describe(b"k" * 32)
    assert described["phone"] == "**********8000"
    assert "13800138000" not in str(described)
    # a plain sha256 of an 11-digit number is reversed by hashing them all; only a keyed digest is kept
    assert hashlib.sha256(b"+8613800138000").hexdigest() not in str(described)
    assert described["phone_hmac"] != audit.LogFilter.parse(phone="13800138000").describe(b"j" * 32)["phone_hmac"]
