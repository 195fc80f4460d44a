"""`dispatch audit log`: every filter, masking by default, CSV/JSONL streaming and keyset paging.

Two real runs in different quarters (by the fake clock) over a registry whose CSV
the expected counts are taken from, with a few numbers made to fail at the outbox.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import pytest

from dispatcher import audit
from tests.conftest import Project, _make_project
from tests.test_audit_ledger import FAKE_NOW, THREE_DISTRICTS, run_campaign
from tests.test_reports import THREE, registry_rows

SECOND_RUN_AT = "2021-05-10T09:30:00+08:00"


def jsonl(result: Any) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("auditlog")
    project = _make_project(root / "project", f"sqlite:///{root / 'project' / 'var' / 'dispatch.db'}")
    rows = registry_rows(project.registry(500, seed=3))
    dingyan = [r["phone"] for r in rows if r["district"] == "dingyan" and not r["opted_out"]]
    failing = set(dingyan[:4])
    project.write("campaigns/ledger-test.yaml", THREE_DISTRICTS)
    env = {"DISPATCH_FAKE_NOW": FAKE_NOW, "DISPATCH_OUTBOX_FAIL_PERMANENT": ",".join(sorted(failing))}
    first = project.dispatch("run", "campaigns/ledger-test.yaml", "--json", env=env)
    assert first.returncode == 0, first.stderr
    second = project.dispatch(
        "run", "campaigns/refund-scam-lucheng.yaml", "--json", env={"DISPATCH_FAKE_NOW": SECOND_RUN_AT}
    )
    assert second.returncode == 0, second.stderr
    runs = {r["campaign_id"]: r["run_id"] for r in json.loads(project.dispatch("runs", "--json").stdout)["runs"]}
    return {"project": project, "rows": rows, "failing": failing, "runs": runs}


def test_numbers_are_masked_everywhere_unless_unmasked(logged: dict[str, Any]) -> None:
    out = logged["project"].dispatch("audit", "log", "--format", "csv")
    assert out.returncode == 0, out.stderr
    body = out.stdout
    assert body.count("\n") > 300  # a result event per recipient of both runs
    full_numbers = {r["phone"] for r in logged["rows"]}
    found = set(re.findall(r"\+86\d{11}", body)) | {"+86" + m for m in re.findall(r"(?<!\d)(1\d{10})(?!\d)", body)}
    assert not (found & full_numbers), "a full number leaked into a masked export"
    assert "****" in body


def test_phone_filter_finds_exactly_that_numbers_events_across_runs(logged: dict[str, Any]) -> None:
    target = next(
        r
        for r in logged["rows"]
        if r["district"] == "lucheng" and not r["opted_out"] and "students" not in r["segments"]
    )
    bare = target["phone"].removeprefix("+86")  # typed as people write it; normalised before matching
    events = jsonl(logged["project"].dispatch("audit", "log", "--phone", bare, "--format", "jsonl", "--unmask"))
    # both campaigns include this resident: sent in each run (the claim before it is one event per batch,
    # which names the row by id and belongs to no one number)
    assert [(e["campaign_id"], e["from_state"], e["to_state"]) for e in events] == [
        ("ledger-test", "sending", "sent"),
        ("refund-scam-lucheng", "sending", "sent"),
    ]
    assert {e["phone"] for e in events} == {target["phone"]}


def test_state_and_error_code_filters_find_the_failed_sends(logged: dict[str, Any]) -> None:
    project = logged["project"]
    failed = jsonl(project.dispatch("audit", "log", "--state", "failed", "--format", "jsonl", "--unmask"))
    assert {e["phone"] for e in failed} == logged["failing"]
    code = failed[0]["error_code"]
    assert code
    by_code = jsonl(project.dispatch("audit", "log", "--error-code", code, "--format", "jsonl"))
    assert [e["event_id"] for e in by_code] == [e["event_id"] for e in failed if e["error_code"] == code]


def test_segment_district_and_run_filters_match_the_registry(logged: dict[str, Any]) -> None:
    project = logged["project"]
    run_id = logged["runs"]["ledger-test"]
    sent = jsonl(
        project.dispatch(
            "audit",
            "log",
            "--run",
            run_id,
            "--segment",
            "退休人员",
            "--district",
            "qishuyan",
            "--state",
            "sent",
            "--format",
            "jsonl",
            "--unmask",
        )
    )
    expected = {
        r["phone"] for r in logged["rows"]
        if r["district"] == "qishuyan" and "retirees" in r["segments"] and not r["opted_out"]
    }  # fmt: skip
    assert expected and {e["phone"] for e in sent} == expected
    assert {e["run_id"] for e in sent} == {run_id}


def test_time_range_and_campaign_filters_split_the_two_runs(logged: dict[str, Any]) -> None:
    project = logged["project"]
    q1 = jsonl(project.dispatch("audit", "log", "--until", "2021-03-31", "--format", "jsonl"))
    q2 = jsonl(project.dispatch("audit", "log", "--since", "2021-04-01", "--format", "jsonl"))
    assert {e["campaign_id"] for e in q1} == {"ledger-test"}
    assert {e["campaign_id"] for e in q2} == {"refund-scam-lucheng"}
    everything = jsonl(project.dispatch("audit", "log", "--format", "jsonl"))
    assert len(q1) + len(q2) == len(everything)
    by_campaign = jsonl(project.dispatch("audit", "log", "--campaign", "refund-scam-lucheng", "--format", "jsonl"))
    assert [e["event_id"] for e in by_campaign] == [e["event_id"] for e in q2]
    # an exact instant with a zone: the second run happened at 01:30 UTC on 10 May
    at = jsonl(
        project.dispatch(
            "audit",
            "log",
            "--since",
            "2021-05-10T01:00:00+00:00",
            "--until",
            "2021-05-10T02:00:00Z",
            "--format",
            "jsonl",
        )
    )
    assert len(at) == len(q2)


def test_csv_and_jsonl_carry_the_same_rows_and_limit_caps_them(logged: dict[str, Any]) -> None:
    project = logged["project"]
    as_csv = project.dispatch("audit", "log", "--district", "lucheng", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    as_json = jsonl(project.dispatch("audit", "log", "--district", "lucheng", "--format", "jsonl"))
    assert [r["event_id"] for r in rows] == [str(e["event_id"]) for e in as_json]
    assert list(rows[0]) == list(audit.LOG_COLUMNS)
    assert len(jsonl(project.dispatch("audit", "log", "--format", "jsonl", "--limit", "7"))) == 7
    table = project.dispatch("audit", "log", "--district", "lucheng")
    assert table.returncode == 0 and "100 events shown" in table.stderr


def test_keyset_pages_return_every_row_once_in_order(logged: dict[str, Any]) -> None:
    _keyset_pages(logged["project"])


def test_keyset_pages_on_postgresql(tmp_path: Any, postgres_url: str) -> None:
    project = _make_project(tmp_path / "project", postgres_url)
    run_campaign(project, size=150)
    _keyset_pages(project)
    for rt in project.runtimes:
        rt.close()


def _keyset_pages(project: Project) -> None:
    store = project.runtime().store
    f = audit.LogFilter.parse(district="lucheng")
    # a worker's results are one event per batch, so a row is (event, delivery): each once, in order
    small = [(r["event_id"], r["delivery_id"]) for r in audit.iter_log(store, f, chunk=7)]
    whole = [(r["event_id"], r["delivery_id"]) for r in audit.iter_log(store, f)]
    assert small == whole and len(whole) > 20 and small == sorted(set(small))
    assert [(r["event_id"], r["delivery_id"]) for r in audit.iter_log(store, f, chunk=7, limit=10)] == whole[:10]
    assert {r["district"] for r in audit.iter_log(store, f)} == {"lucheng"}
    assert THREE[0] == "lucheng"
