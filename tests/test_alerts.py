"""Early warning (预警劝阻): one resident reached at once by SMS (and call), escalated to their grid until confirmed.

Real `dispatch` subprocesses (alert send, worker, scheduler, web) on PostgreSQL and Redis; the business
clock of a subprocess is moved with DISPATCH_CLOCK_OFFSET to make escalation steps due.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM, PrismServer, prism_server  # noqa: F401

from dispatcher import alerting
from dispatcher.follow import follow_run
from dispatcher.phones import mask
from dispatcher.providers.outbox.gateway import read_outbox
from dispatcher.providers.twilio.voice import TwilioVoice

if TYPE_CHECKING:
    from tests.conftest import Project

pytestmark = pytest.mark.slow


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _process(project: Project, name: str, *args: str, ready: str, env: dict[str, str] | None = None) -> Iterator[Path]:
    log = project.root / "var" / f"{name}.log"
    proc = project.popen(*args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait(lambda: ready in log.read_text(), 30, f"{name} to start")
        yield log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _resident(project: Project) -> dict[str, str]:
    """A resident of the registry (generated and imported) with a grid."""
    path = project.registry(size=60, seed=7)
    with path.open(encoding="utf-8") as fh:
        return next(row for row in csv.DictReader(fh) if row.get("grid"))


def _roster(project: Project, grid: str) -> Path:
    return project.write(
        "var/roster.csv",
        f"grid,role,name,phone\n{grid},grid_worker,王网格,13900007001\n{grid},police_duty,警格值班,13900007002\n",
    )


def _send(project: Project, *args: str, env: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    result = project.dispatch("alert", "send", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _status(project: Project, alert_id: str) -> dict:  # type: ignore[type-arg]
    result = project.dispatch("alert", "status", alert_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _sent_to(project: Project, phone: str, channel: str = "sms") -> list[dict]:  # type: ignore[type-arg]
    """What the outbox took for ``phone``: SMS lines, or the voice channel's call lines."""
    return [m for m in read_outbox(project.outbox) if m.get("to") == phone and m.get("channel", "sms") == channel]


def test_alert_sms_goes_out_on_the_urgent_lane_and_a_repeated_id_creates_nothing(redis_project: Project) -> None:
    project = redis_project
    with _process(project, "worker", "worker", "--threads", "2", ready="worker.started"):
        first = _send(project, "--phone", "13812345678", "--type", "刷单返利", "--id", "HZ-2021-0001")
        assert first["created"] and first["phone"] == mask("+8613812345678")
        assert first["district"] == ""  # not in the registry, alerted all the same
        _wait(lambda: bool(_sent_to(project, "+8613812345678")), 20, "the alert SMS")
        _wait(lambda: bool(_sent_to(project, "+8613812345678", "voice")), 20, "the alert call")
        again = _send(project, "--phone", "13812345678", "--type", "brushing", "--id", "HZ-2021-0001")
    assert again["id"] == first["id"] and not again["created"] and again["fired"] == []
    messages = _sent_to(project, "+8613812345678")
    assert len(messages) == 1
    assert len(_sent_to(project, "+8613812345678", "voice")) == 1  # and one call, at once
    assert "刷单返利" in messages[0]["body"] and first["id"] in messages[0]["body"]
    assert "退订" not in messages[0]["body"]  # a warning to one person carries no opt-out line
    listed = json.loads(project.dispatch("alerts", "--json").stdout)["alerts"]
    assert [a["id"] for a in listed] == [first["id"]]
    st = _status(project, first["id"])
    sms = st["steps"][0]
    assert sms["action"] == "sms" and sms["state"] == "fired"
    run = json.loads(project.dispatch("status", sms["run_id"], "--json").stdout)
    assert run["channel"] == "sms" and run["total"] == 1
    # the run is urgent with the alert id as its reason
    mine = project.runtime().store.get_run(sms["run_id"])
    assert mine.priority == "urgent" and mine.reason == first["id"]


def test_bad_alert_input_is_one_line_exit_2_and_nothing_is_written(redis_project: Project) -> None:
    project = redis_project
    for args, field in (
        (("--phone", "12345", "--type", "brushing"), "phone:"),
        (("--phone", "13812345678", "--type", "lottery"), "type:"),
    ):
        result = project.dispatch("alert", "send", *args)
        assert result.returncode == 2, result.stderr
        assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "13812345678" not in result.stderr
    assert json.loads(project.dispatch("alerts", "--json").stdout)["alerts"] == []


def test_unconfirmed_alert_escalates_to_the_grid_roster_when_its_step_is_due(redis_project: Project) -> None:
    project = redis_project
    resident = _resident(project)
    roster = project.dispatch("roster", "import", str(_roster(project, resident["grid"])))
    assert roster.returncode == 0, roster.stderr
    alert = _send(project, "--phone", resident["phone"], "--type", "impersonating_police", "--id", "ESC-1")
    assert alert["grid"] == resident["grid"]
    offset = float(project.env["DISPATCH_CLOCK_OFFSET"])
    empty = project.root / "var" / "no-campaigns"
    empty.mkdir()
    with _process(project, "worker", "worker", ready="worker.started"):
        # the scheduler's clock 11 minutes on: the 2 and 5 minute calls and the 10 minute escalation are due
        env = {"DISPATCH_CLOCK_OFFSET": str(offset + 660), "DISPATCH_SCHEDULER_TICK": "0.25"}
        with _process(project, "scheduler", "scheduler", "--campaigns", str(empty), ready="scheduler.leader", env=env):
            _wait(lambda: len(_sent_to(project, "+8613900007002")) == 1, 30, "the police grid's SMS")
            _wait(lambda: len(_sent_to(project, "+8613900007001")) == 1, 30, "the grid worker's SMS")
    body = _sent_to(project, "+8613900007001")[0]["body"]
    digits = resident["phone"][-11:]
    assert alert["id"] in body and "冒充公检法" in body and digits[-4:] in body
    assert digits not in body  # the resident is masked to the last four digits
    st = _status(project, alert["id"])
    # the calls were placed (the outbox's calls are never answered) and none was confirmed
    calls = [s for s in st["steps"] if s["action"] == "call"]
    assert [s["state"] for s in calls] == ["fired"] * 3
    assert all(d["state"] == "sent" for s in calls for d in s["deliveries"]) and st["confirmed_at"] is None
    notify = [s for s in st["steps"] if s["action"] == "notify_grid"]
    assert [s["state"] for s in notify] == ["fired"]
    assert sorted(d["phone"] for d in notify[0]["deliveries"]) == [mask("+8613900007001"), mask("+8613900007002")]
    # what the runs did is in the alert's own chain: the SMS handed over, each step fired once
    assert "sms0.sent" in [m["name"] for m in st["milestones"]]
    kinds = [e["kind"] for e in _chain(project, alert["id"])]
    assert kinds[0] == "alert.created" and kinds.count("alert.step") == 5 and "alert.milestone" in kinds
    chain = project.dispatch("audit", "verify")
    assert chain.returncode == 0, chain.stdout + chain.stderr
    assert f"alert:{alert['id']}" in chain.stdout


def test_closing_an_alert_records_its_outcome_and_cancels_the_steps_left(redis_project: Project) -> None:
    project = redis_project
    alert = _send(project, "--phone", "13812340000", "--type", "loan")
    closed = project.dispatch(
        "alert", "close", alert["id"], "--outcome", "dissuaded", "--note", "回拨13812340000已劝阻"
    )
    assert closed.returncode == 0, closed.stderr
    st = _status(project, alert["id"])
    assert st["status"] == "closed" and st["outcome"] == "dissuaded"
    assert "13812340000" not in st["note"] and st["note"].endswith("已劝阻")
    assert {s["state"] for s in st["steps"][2:]} == {"cancelled"}
    again = project.dispatch("alert", "close", alert["id"], "--outcome", "reached")
    assert again.returncode == 2 and "already closed" in again.stderr
    assert json.loads(project.dispatch("alerts", "--open", "--json").stdout)["alerts"] == []
    report = json.loads(project.dispatch("report", "alerts", "--json").stdout)
    assert report["alerts"] == 1 and report["by_outcome"] == {"dissuaded": 1}
    assert report["by_fraud_type"] == {"loan": 1}


def test_a_step_due_after_the_leader_is_killed_fires_exactly_once_by_the_new_leader(redis_project: Project) -> None:
    project = redis_project
    project.write(
        "alerting.yaml",
        "steps:\n  - {after: 0s, action: sms}\n  - {after: 3s, action: sms}\n  - {after: 9s, action: sms}\n",
    )
    empty = project.root / "var" / "no-campaigns"
    empty.mkdir()
    env = {"DISPATCH_SCHEDULER_LEASE": "3", "DISPATCH_SCHEDULER_TICK": "0.25"}
    logs = [project.root / "var" / f"scheduler-{i}.log" for i in range(2)]
    first = project.popen(
        "scheduler", "--campaigns", str(empty), env=env, stdout=logs[0].open("w"), stderr=subprocess.STDOUT
    )
    try:
        _wait(lambda: "scheduler.leader" in logs[0].read_text(), 30, "the first scheduler to lead")
        second = project.popen(
            "scheduler", "--campaigns", str(empty), env=env, stdout=logs[1].open("w"), stderr=subprocess.STDOUT
        )
        alert = _send(project, "--phone", "13812349999", "--type", "investment")

        def state(seq: int) -> str:
            return str(_status(project, alert["id"])["steps"][seq]["state"])

        _wait(lambda: state(1) == "fired", 20, "the 3 s step")
        first.send_signal(signal.SIGKILL)  # between steps: the 9 s step is the new leader's
        first.wait(10)
        _wait(lambda: state(2) == "fired", 30, "the 9 s step")
        time.sleep(1.0)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    st = _status(project, alert["id"])
    runs = [s["run_id"] for s in st["steps"]]
    assert len(set(runs)) == 3 and all(runs)
    chain = [e for e in _chain(project, alert["id"]) if e["kind"] == "alert.step"]
    assert sorted(e["payload"]["seq"] for e in chain) == [0, 1, 2]  # each step once, none twice
    leaders = [s["fired_by"] for s in st["steps"]]
    assert leaders[1] != leaders[2] and leaders[2].startswith("scheduler:")  # the new leader fired it


def _chain(project: Project, alert_id: str) -> list[dict]:  # type: ignore[type-arg]
    rt = project.runtime()
    return rt.store.alerts.chain_events(alert_id)


def test_roster_import_reports_each_bad_row_and_keeps_the_good_ones(redis_project: Project) -> None:
    project = redis_project
    path = project.write(
        "var/roster.csv",
        "grid,role,name,phone\n"
        "DY-01,grid_worker,王网格,13900007001\n"
        "DY-01,sheriff,李,13900007003\n"
        "XX-99,grid_worker,赵,13900007004\n"
        "DY-02,police_duty,值班,12345\n"
        "DY-02,police_duty,值班,13900007005\n",
    )
    result = project.dispatch("roster", "import", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{path}:3: role: unknown role 'sheriff' (known: grid_worker, police_duty)",
        f"{path}:4: grid: grid 'XX-99' belongs to no known district",
        f"{path}:5: phone: not a valid phone number: *1345",
    ] or (len(lines) == 3 and lines[2].startswith(f"{path}:5: phone: "))
    assert "2 roster row(s) imported, 3 refused" in result.stdout
    rt = project.runtime()
    assert [e.phone for e in rt.store.alerts.roster_for("DY-02")] == ["+8613900007005"]


def test_bad_alerting_policy_is_one_line_with_its_place_exit_2(redis_project: Project) -> None:
    project = redis_project
    project.write("alerting.yaml", "steps:\n  - {after: 0s, action: sms}\n  - {after: soon, action: call}\n")
    result = project.dispatch("alert", "send", "--phone", "13812345678", "--type", "loan")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"{project.root / 'alerting.yaml'}:3: steps.1.after: ")
    assert json.loads(project.dispatch("alerts", "--json").stdout)["alerts"] == []


def test_api_alerts_need_a_live_key_and_are_idempotent_on_the_external_id(redis_project: Project) -> None:
    from tests.conftest import serve_web

    project = redis_project
    added = project.dispatch("apikeys", "add", "fzzx")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("dak_")
    listed = project.dispatch("apikeys", "list")
    assert "fzzx" in listed.stdout and key not in listed.stdout
    body = {"phone": "13812345678", "type": "refund", "id": "API-1", "source": "96110 转来"}
    with serve_web(project, project.root / "var" / "web.log", DISPATCH_FAKE_NOW="") as (base, _proc):
        url = f"{base}/api/alerts"
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer dak_nope"}).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        bad = httpx.post(url, json={**body, "type": "lottery"}, headers=auth)
        assert bad.status_code == 422 and bad.json()["field"] == "type"
        created = httpx.post(url, json=body, headers=auth)
        assert created.status_code == 201, created.text
        assert created.json()["phone"] == mask("+8613812345678")
        repeated = httpx.post(url, json=body, headers=auth)
        assert repeated.status_code == 200 and repeated.json()["id"] == created.json()["id"]
        assert project.dispatch("apikeys", "revoke", "fzzx").returncode == 0
        revoked = httpx.post(url, json={**body, "id": "API-2"}, headers=auth)
        assert revoked.status_code == 403
        assert "13812345678" not in revoked.text
    alerts = json.loads(project.dispatch("alerts", "--json").stdout)["alerts"]
    assert [a["external_id"] for a in alerts] == ["API-1"]


def test_dashboard_lists_open_alerts_to_operators_and_closes_one_through_its_form(redis_project: Project) -> None:
    import re

    from tests.conftest import serve_web
    from tests.test_dashboard_browser import add_user, login

    project = redis_project
    assert add_user(project, "op", "operator", "operator-pass-1234").returncode == 0
    assert add_user(project, "au", "auditor", "auditor-pass-1234").returncode == 0
    older = _send(project, "--phone", "13812340001", "--type", "loan")
    newer = _send(project, "--phone", "13812340002", "--type", "refund")
    with serve_web(project, project.root / "var" / "web.log", DISPATCH_FAKE_NOW="") as (base, _proc):
        auditor = httpx.Client()
        assert login(base, "au", "auditor-pass-1234", auditor).status_code == 303
        assert auditor.get(base + "/dashboard/alerts").status_code == 403
        client = httpx.Client()
        assert login(base, "op", "operator-pass-1234", client).status_code == 303
        listing = client.get(base + "/dashboard/alerts")
        assert listing.status_code == 200
        html = listing.text
        assert html.index(newer["id"]) < html.index(older["id"])  # newest first
        assert "13812340001" not in html and mask("+8613812340001") in html
        token = re.search(r'name="csrf" value="([^"]+)"', html)
        assert token
        action = f"{base}/dashboard/alerts/{older['id']}/close"
        forged = client.post(action, data={"outcome": "reached"}, headers={"Origin": base})
        assert forged.status_code == 403
        done = client.post(
            action,
            data={"outcome": "stop_payment_requested", "note": "已联系银行止付", "csrf": token.group(1)},
            headers={"Origin": base},
            follow_redirects=False,
        )
        assert done.status_code == 303, done.text
        assert older["id"] not in client.get(base + "/dashboard/alerts").text
    st = _status(project, older["id"])
    assert st["status"] == "closed" and st["outcome"] == "stop_payment_requested"


def test_alert_against_prism_texts_and_calls_and_a_key_press_stops_the_escalation(
    project: Project, prism: PrismServer
) -> None:
    from starlette.testclient import TestClient
    from twilio.request_validator import RequestValidator

    from dispatcher.web.app import create_app

    public = "https://dispatch.example.gov.cn"
    project.env.update(
        {
            "DISPATCH_GATEWAY": "twilio",
            "DISPATCH_VOICE_GATEWAY": "twilio",
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM": FROM,
            "DISPATCH_TWILIO_BASE_URL": prism.url,
            "DISPATCH_PUBLIC_URL": public,
        }
    )
    resident = _resident(project)
    assert project.dispatch("roster", "import", str(_roster(project, resident["grid"]))).returncode == 0
    # Prism reads a repeated form field as its last value, so the StatusCallbackEvent list Twilio wants fails
    # its check (stoplightio/prism#2473): the call leaves it at Twilio's default, the rest is the real adapter
    rt = project.runtime(
        voice_factory=lambda s: TwilioVoice(
            account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_=FROM, public_url=public, base_url=prism.url,
            status_events=(),
        )
    )  # fmt: skip
    taken = alerting.send_alert(
        rt, alerting.AlertRequest(resident["phone"], "investment", external_id="PRISM-1", actor="operator")
    )
    for run_id in taken.fired:  # the embedded broker: this process sends the runs of the steps it fired
        follow_run(rt, run_id, embedded=True)
    alert = alerting.alert_json(taken.alert)
    st = _status(project, alert["id"])
    sms, call = st["steps"][0], st["steps"][1]
    assert (sms["action"], sms["state"], call["action"], call["state"]) == ("sms", "fired", "call", "fired")
    sms_row = next(iter(rt.store.deliveries(sms["run_id"])))
    call_row = next(iter(rt.store.deliveries(call["run_id"])))
    assert sms_row.state == "sent" and sms_row.gateway == "twilio" and (sms_row.provider_id or "").startswith("SM")
    assert call_row.state == "sent" and (call_row.provider_id or "").startswith("CA")
    assert prism.violations() == []

    # the resident presses 1: Twilio posts the Gather's digits, signed
    path = f"/webhooks/twilio/voice/{call_row.id}/gather"
    params = {"CallSid": call_row.provider_id or "", "Digits": "1", "AccountSid": ACCOUNT_SID}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(public + path, params)
    pressed = TestClient(create_app(rt)).post(path, data=params, headers={"X-Twilio-Signature": signature})
    assert pressed.status_code == 200, pressed.text

    # a leader whose clock is 11 minutes on: the confirmation cancels the retries and the escalation first
    empty = project.root / "var" / "no-campaigns"
    empty.mkdir()
    offset = float(project.env["DISPATCH_CLOCK_OFFSET"])
    env = {"DISPATCH_CLOCK_OFFSET": str(offset + 660), "DISPATCH_SCHEDULER_TICK": "0.25"}
    with _process(project, "scheduler", "scheduler", "--campaigns", str(empty), ready="scheduler.leader", env=env):
        _wait(lambda: _status(project, alert["id"])["confirmed_at"] is not None, 30, "the confirmation")
        time.sleep(1.0)
    st = _status(project, alert["id"])
    assert [s["state"] for s in st["steps"]] == ["fired", "fired", "cancelled", "cancelled", "cancelled"]
    assert "call1.confirmed" in [m["name"] for m in st["milestones"]]
    assert st["first_contact_at"] is not None
    assert all(s["run_id"] is None for s in st["steps"][2:])  # nobody else was called or told
    chain = project.dispatch("audit", "verify")
    assert chain.returncode == 0, chain.stdout + chain.stderr
