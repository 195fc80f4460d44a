"""`dispatch audit verify` against a real run, then against the events table tampered with raw SQL.

Each tamper is a single-row change made directly in the database (SQLite and
PostgreSQL), the way someone with database access would cover their tracks:
edit a field, delete a row, swap two rows. Verify must fail (exit 1) and name the
event; after the row is put back it must pass again, so each check really is
about that one row.
"""

from __future__ import annotations

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
    import json

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


def _restore(conn: Any, *rows: dict[str, Any]) -> None:
    for i, row in enumerate(rows):
        _set(conn, row["id"], {"seq": -1 - i})
    for row in rows:
        _set(conn, row["id"], {k: v for k, v in row.items() if k != "id"})


def test_verify_names_the_event_after_any_single_row_is_edited_deleted_or_swapped(
    any_db_project: Any,
) -> None:
    run_id = run_campaign(any_db_project)
    engine = engine_of(any_db_project)
    events = event_rows(engine, run_id)
    intact = verify_cli(any_db_project)
    assert intact.returncode == 0, intact.stderr
    # head + pending->sending + sending->sent for every recipient that was not skipped
    assert events[0]["kind"] == "run.created" and len(events) > 100
    assert f"ok {run_id}: {len(events)} events" in intact.stdout
    store = any_db_project.runtime().store
    head, mid, nxt, last = events[0], events[len(events) // 2], events[len(events) // 2 + 1], events[-1]
    sent = next(e for e in events if e["to_state"] == "sent")

    # (description, tamper, undo, the event id the message must name, a phrase it must contain)
    cases = [
        (
            "edit a to_state",
            lambda c: _set(c, sent["id"], {"to_state": "failed"}),
            lambda c: _set(c, sent["id"], {"to_state": "sent"}),
            sent["id"],
            "edited",
        ),
        (
            "edit the time",
            lambda c: _set(c, mid["id"], {"at": last["at"]}),
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
            f"expected seq {mid['seq']}",
        ),
        (
            "delete the head",
            lambda c: c.execute(sa.text("DELETE FROM events WHERE id = :i"), {"i": head["id"]}),
            lambda c: _insert(c, head),
            events[1]["id"],
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

    # the last event has no successor to trip over: the recorded tail names it by seq
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events WHERE id = :i"), {"i": last["id"]})
    result = verify_cli(any_db_project)
    assert result.returncode == 1
    assert f"seq {last['seq']}" in result.stderr and "missing" in result.stderr, result.stderr


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
    import json

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
