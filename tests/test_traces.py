"""Operators read per-attempt HTTP traces: `dispatch trace`, the dashboard's delivery page, and the purge.

A real run goes through the Twilio adapter (the real `twilio` client) to Prism serving
Twilio's own OpenAPI description, so the traces are what a Twilio exchange really
records; the commands run as subprocesses and the dashboard as a real `dispatch web`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prism_support import ACCOUNT_SID, AUTH_TOKEN, PrismServer, prism_server  # noqa: F401
from twilio_support import Clock, campaign_yaml, drive, start

from dispatcher.phones import mask
from tests.conftest import Project, _make_project
from tests.conftest import serve_web as serve
from tests.test_dashboard_browser import add_user, login
from tests.test_twilio_gateway import Scenario, gateway_for

OPERATOR_PW = "operator's long password"
AUDITOR_PW = "auditor's long password"
#: what the Authorization header of every Twilio request carries: it must never be in a trace
BASIC = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
#: a valid Chinese mobile number that no synthetic registry of this size holds
STRANGER = "+8619999990000"


def traced_run(project: Project, prism: PrismServer, size: int = 8) -> dict[str, Any]:
    """A run through Prism: one number rate-limited once (429, then sent), one refused (400, 21211)."""
    project.registry(size=size, seed=5)
    clock = Clock()
    scenario = Scenario()
    rt = project.runtime(clock=clock, gateway_factory=lambda s: gateway_for(prism.url, scenario, clock=clock))
    path = project.write("campaigns/traced.yaml", campaign_yaml("traced", send_by=clock() + timedelta(hours=2)))
    run_id = start(rt, path)
    pending = [r.phone for r in rt.store.deliveries(run_id) if r.state == "pending"]
    limited, refused = pending[0], pending[1]
    scenario.set(limited, "code=429, example=tooMany", times=1)
    scenario.set(refused, "code=400, example=invalidTo")
    drive(rt, run_id, clock)
    phones = [r.phone for r in rt.store.deliveries(run_id)]
    assert STRANGER not in phones
    return {"run_id": run_id, "limited": limited, "refused": refused, "phones": phones}


def trace_json(project: Project, run_id: str, phone: str) -> dict[str, Any]:
    result = project.dispatch("trace", run_id, "--phone", phone, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def audit_chain(project: Project) -> list[dict[str, Any]]:
    result = project.dispatch("audit", "exports", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout)["exports"])


def assert_nothing_secret(text: str, phones: list[str]) -> None:
    assert ACCOUNT_SID not in text and AUTH_TOKEN not in text and BASIC not in text
    for phone in phones:
        assert phone not in text and phone[1:] not in text  # neither E.164 nor its digits


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, prism: PrismServer) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("traces")
    project = _make_project(root / "project", f"sqlite:///{root / 'project' / 'var' / 'dispatch.db'}")
    info = traced_run(project, prism)
    yield {**info, "project": project, "root": root}
    for rt in project.runtimes:
        rt.close()


@pytest.mark.slow
def test_trace_shows_every_attempt_with_its_state_change_and_exchange_redacted(traced: dict[str, Any]) -> None:
    project, run_id, limited = traced["project"], traced["run_id"], traced["limited"]
    data = trace_json(project, run_id, limited)
    assert data["phone"] == "*" * (len(limited) - 4) + limited[-4:]
    assert data["state"] == "sent"
    attempts = data["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert [(a["from_state"], a["to_state"], a["outcome"]) for a in attempts] == [
        ("sending", "pending", "retry"),
        ("sending", "sent", "sent"),
    ]
    assert attempts[0]["error_code"] == "twilio.20429" and attempts[1]["error_code"] is None
    assert all(a["trace"] == "kept" for a in attempts)
    first, second = attempts[0]["exchanges"][0], attempts[1]["exchanges"][0]
    assert (first["method"], first["status"], second["status"]) == ("POST", 429, 201)
    assert second["url"].endswith("/Messages.json") and "/Accounts/[redacted]/" in second["url"]
    assert second["request_headers"]["Authorization"] == "[redacted]"
    assert second["request"]["To"] == data["phone"] and second["request"]["Body"].startswith("【")
    assert second["response"]["sid"] == data["provider_id"]
    assert isinstance(second["elapsed_ms"], int | float)

    text = project.dispatch("trace", run_id, "--phone", limited)
    assert text.returncode == 0, text.stderr
    assert "attempt 1" in text.stdout and "attempt 2" in text.stdout
    assert "-> 429" in text.stdout and "-> 201" in text.stdout and "sending→sent" in text.stdout
    assert "'Authorization': '[redacted]'" in text.stdout or '"Authorization": "[redacted]"' in text.stdout
    assert_nothing_secret(text.stdout + text.stderr + json.dumps(data, ensure_ascii=False), traced["phones"])

    refused = trace_json(project, run_id, traced["refused"])
    assert refused["state"] == "failed"
    assert [(a["to_state"], a["error_code"]) for a in refused["attempts"]] == [("failed", "twilio.21211")]
    assert refused["attempts"][0]["exchanges"][0]["status"] == 400

    views = [e for e in audit_chain(project) if e["kind"] == "trace.view"]
    assert views and all(v["payload"]["via"] == "cli" and v["payload"]["run"] == run_id for v in views)
    assert {v["payload"]["phone"] for v in views} >= {data["phone"], refused["phone"]}


@pytest.mark.slow
def test_trace_refuses_a_bad_number_an_unknown_run_and_a_stranger_in_one_line_with_exit_2(
    traced: dict[str, Any],
) -> None:
    project, run_id = traced["project"], traced["run_id"]
    for args, says in (
        ((run_id, "--phone", "12345"), "phone: "),
        (("20990101-000000-ffffff", "--phone", traced["limited"]), "no run with id"),
        ((run_id, "--phone", STRANGER), f"nobody with number {mask(STRANGER)} in run"),
    ):
        result = project.dispatch("trace", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], result.stderr
        assert "Traceback" not in result.stderr and STRANGER not in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_delivery_page_shows_the_exchanges_to_operators_records_the_view_and_refuses_auditors(
    traced: dict[str, Any],
) -> None:
    project, run_id, limited = traced["project"], traced["run_id"], traced["limited"]
    for name, role, pw in (("olga", "operator", OPERATOR_PW), ("aldo", "auditor", AUDITOR_PW)):
        made = add_user(project, name, role, pw)
        assert made.returncode == 0, made.stderr
    before = len([e for e in audit_chain(project) if e["kind"] == "trace.view"])
    with serve(project, traced["root"] / "web.log") as (base, _proc):
        operator = httpx.Client(timeout=15)
        assert login(base, "olga", OPERATOR_PW, operator).status_code == 303
        page = operator.get(f"{base}/dashboard/delivery", params={"run": run_id, "phone": limited})
        assert page.status_code == 200, page.text
        assert 'data-attempt="1"' in page.text and 'data-attempt="2"' in page.text
        assert "429" in page.text and "201" in page.text and "/Accounts/[redacted]/" in page.text
        assert "&quot;Authorization&quot;: &quot;[redacted]&quot;" in page.text
        assert_nothing_secret(page.text, traced["phones"])

        # reachable from the ledger search: each event links to its person's delivery page
        ledger = operator.get(f"{base}/dashboard/ledger", params={"run": run_id, "state": "failed"})
        assert ledger.status_code == 200
        link = ledger.text.split('href="/dashboard/delivery?', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        linked = operator.get(f"{base}/dashboard/delivery?{link}")
        assert linked.status_code == 200 and "twilio.21211" in linked.text and 'data-attempt="1"' in linked.text

        malformed = operator.get(f"{base}/dashboard/delivery", params={"run": run_id, "phone": "12345"})
        assert malformed.status_code == 400 and "phone: " in malformed.text
        stranger = operator.get(f"{base}/dashboard/delivery", params={"run": run_id, "phone": STRANGER})
        assert stranger.status_code == 404 and STRANGER not in stranger.text

        auditor = httpx.Client(timeout=15)
        assert login(base, "aldo", AUDITOR_PW, auditor).status_code == 303
        refused = auditor.get(f"{base}/dashboard/delivery", params={"run": run_id, "phone": limited})
        assert refused.status_code == 403 and "Only operators" in refused.text and "[redacted]" not in refused.text
        assert "/dashboard/delivery?" not in auditor.get(f"{base}/dashboard/ledger", params={"run": run_id}).text
        anonymous = httpx.get(f"{base}/dashboard/delivery", params={"run": run_id, "phone": limited})
        assert anonymous.status_code == 401
    everything = [e for e in audit_chain(project) if e["kind"] == "trace.view"]  # newest first
    views = everything[: len(everything) - before]
    dashboard_views = [v for v in views if v["payload"]["via"] == "dashboard"]
    # the page by phone, the page from the ledger link, and the stranger: each on record, by whom
    assert len(dashboard_views) == 3 and {v["actor"] for v in dashboard_views} == {"web:olga"}
    assert all(traced["limited"] not in json.dumps(v) for v in views)


@pytest.mark.slow
def test_purge_clears_old_traces_keeps_the_ledger_verifiable_and_is_recorded(
    tmp_path: Path, database_url: str, prism: PrismServer
) -> None:
    project = _make_project(tmp_path / "project", database_url)
    info = traced_run(project, prism, size=5)
    run_id, limited = info["run_id"], info["limited"]
    assert project.dispatch("audit", "verify").returncode == 0

    # the run's attempts are from yesterday: a 30-day retention keeps them all
    kept = project.dispatch("purge", "--traces-older-than", "30d", "--json")
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["attempts"] == 0
    assert all(a["trace"] == "kept" for a in trace_json(project, run_id, limited)["attempts"])

    purged = project.dispatch("purge", "--traces-older-than", "1h", "--json")
    assert purged.returncode == 0, purged.stderr
    cleared = json.loads(purged.stdout)["attempts"]
    assert cleared == len(info["phones"]) + 1  # one attempt each, two for the rate-limited number

    verified = project.dispatch("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    data = trace_json(project, run_id, limited)
    assert [(a["to_state"], a["trace"], a["exchanges"]) for a in data["attempts"]] == [
        ("pending", "purged", []),
        ("sent", "purged", []),
    ]
    assert all(a["trace_purged_at"] for a in data["attempts"]) and data["state"] == "sent"
    text = project.dispatch("trace", run_id, "--phone", limited)
    assert text.stdout.count("trace purged at") == 2

    purges = [e for e in audit_chain(project) if e["kind"] == "trace.purge"]
    assert [p["payload"]["attempts"] for p in purges] == [cleared, 0]  # newest first
    assert purges[0]["payload"]["older_than"] == "1h" and purges[0]["actor"]
    listed = project.dispatch("audit", "exports").stdout
    line = next(x for x in listed.splitlines() if "trace.purge via cli on {" in x and "'older_than': '1h'" in x)
    assert f"'attempts': {cleared}," in line

    # the default period comes from the settings; a bad one is one line, exit 2
    default = project.dispatch("purge", "--json", env={"DISPATCH_TRACE_RETENTION": "2h"})
    assert default.returncode == 0 and json.loads(default.stdout)["older_than"] == "2h"
    for bad in ("soon", "0d"):
        refused = project.dispatch("purge", "--traces-older-than", bad)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "traces-older-than" in refused.stderr and "Traceback" not in refused.stderr


def test_a_version_4_delivery_log_gains_the_purge_stamp_in_place(database_url: str) -> None:
    import sqlalchemy as sa

    from dispatcher.store import open_store
    from dispatcher.store import schema as t

    store = open_store(database_url)
    with store.engine.begin() as conn:  # what a version 4 program left: attempts without trace_purged_at
        conn.execute(sa.text("ALTER TABLE attempts DROP COLUMN trace_purged_at"))
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '4' WHERE key = 'schema_version'"))
    store.close()
    upgraded = open_store(database_url)
    assert upgraded.schema_version() == t.SCHEMA_VERSION
    with upgraded.engine.connect() as conn:
        assert "trace_purged_at" in {c["name"] for c in sa.inspect(conn).get_columns("attempts")}
    assert upgraded.traces.purge(upgraded.clock(), actor="test", payload={}) == 0
    upgraded.close()
