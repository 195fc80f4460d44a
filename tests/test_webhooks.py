"""Webhooks: Twilio-signed status callbacks and inbound replies, HMAC-signed delivery reports.

Rows get their SIDs from a real send (the Twilio adapter against a stateful local
Twilio peer); callbacks are signed exactly as Twilio signs them
(``RequestValidator.compute_signature`` over the public URL and the form fields)
and posted to the real Starlette app.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM, free_port
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator
from twilio_support import Clock, FakeTwilio, LocalServer, campaign_yaml, drive, start

from dispatcher.audit import verify
from dispatcher.providers.http.webhooks import report_signature
from dispatcher.web.app import create_app

PUBLIC_URL = "https://dispatch.example.org"
REPORT_SECRET = "report-secret-for-tests-91c2"


@pytest.fixture
def twilio_peer() -> Iterator[tuple[FakeTwilio, LocalServer]]:
    peer = FakeTwilio(set(), set())
    server = LocalServer(peer)
    yield peer, server
    server.close()


@pytest.fixture
def sent_run(any_db_project: Any, twilio_peer: tuple[FakeTwilio, LocalServer]) -> tuple[Any, str, Any]:
    """A project (SQLite, then PostgreSQL) whose 6-person run went out through Twilio; env set for the app."""
    project = any_db_project
    _peer, server = twilio_peer
    project.env.update(
        {
            "DISPATCH_PUBLIC_URL": PUBLIC_URL,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM": FROM,
            "DISPATCH_TWILIO_BASE_URL": server.url,
            "DISPATCH_GATEWAY": "twilio",
            "DISPATCH_HTTP_REPORT_SECRET": REPORT_SECRET,
        }
    )
    project.registry(size=6, seed=7)
    clock = Clock()
    rt = project.runtime(clock=clock)
    run_id = start(rt, project.write("campaigns/hooks.yaml", campaign_yaml("hooks")))
    drive(rt, run_id, clock)
    return project, run_id, rt


def signed_post(client: TestClient, path: str, params: dict[str, str], *, token: str = AUTH_TOKEN) -> httpx.Response:
    signature = RequestValidator(token).compute_signature(PUBLIC_URL + path, params)
    return client.post(path, data=params, headers={"X-Twilio-Signature": signature})


def rows(rt: Any, run_id: str) -> list[dict[str, Any]]:
    return [r for r in rt.store.deliveries(run_id) if r.provider_id]


def test_signed_callback_moves_row_to_delivered_and_forged_or_late_ones_change_nothing(sent_run: Any) -> None:
    _project, run_id, rt = sent_run
    first, second = rows(rt, run_id)[:2]
    client = TestClient(create_app(rt))
    path = "/webhooks/twilio/status"

    delivered = {"MessageSid": first.provider_id, "MessageStatus": "delivered", "AccountSid": ACCOUNT_SID}
    assert signed_post(client, path, delivered).status_code == 204
    assert rt.store.provider_events.state_of(first.provider_id) == ["delivered"]

    # replayed out of order: a late "sent" never overwrites "delivered"; a repeat is harmless
    late = {**delivered, "MessageStatus": "sent"}
    assert signed_post(client, path, late).status_code == 204
    assert signed_post(client, path, delivered).status_code == 204
    assert rt.store.provider_events.state_of(first.provider_id) == ["delivered"]

    # forged (wrong key) and unsigned callbacks are refused and change nothing
    forged = {"MessageSid": second.provider_id, "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert signed_post(client, path, forged, token="not-the-auth-token").status_code == 403
    assert client.post(path, data=forged).status_code == 403
    # a valid signature for other fields does not cover tampered ones
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, {**forged, "MessageStatus": "sent"})
    assert client.post(path, data=forged, headers={"X-Twilio-Signature": signature}).status_code == 403
    assert rt.store.provider_events.state_of(second.provider_id) == ["sent"]

    undelivered = {**forged}
    assert signed_post(client, path, undelivered).status_code == 204
    row = next(r for r in rt.store.deliveries(run_id) if r.id == second.id)
    assert (row.state, row.error_code) == ("undelivered", "twilio.30003")
    assert [a.outcome for a in rt.store.attempts_for(second.id)][-1] == "callback"
    # every move a callback made is in the run's hash-chained ledger
    assert [r.problem for r in verify(rt.store, run_id)] == [None]


def test_delivery_reports_never_lower_the_parts_sent_and_status_agrees_with_the_department_report(
    sent_run: Any,
) -> None:
    project, run_id, rt = sent_run
    first, second = rows(rt, run_id)[:2]

    def parts_sent() -> int:
        result = project.dispatch("status", run_id, "--json")
        assert result.returncode == 0, result.stderr
        return int(json.loads(result.stdout)["parts_sent"])

    before = parts_sent()
    assert before > 0
    client = TestClient(create_app(rt))
    path = "/webhooks/twilio/status"
    base = {"AccountSid": ACCOUNT_SID}
    assert (
        signed_post(
            client, path, {**base, "MessageSid": first.provider_id, "MessageStatus": "delivered"}
        ).status_code
        == 204
    )
    assert (
        signed_post(
            client,
            path,
            {**base, "MessageSid": second.provider_id, "MessageStatus": "undelivered", "ErrorCode": "30003"},
        ).status_code
        == 204
    )
    assert parts_sent() == before, "a delivery report does not un-send the parts the gateway accepted"
    year = rt.store.get_run(run_id).created_at.year
    report = project.dispatch("report", "departments", "--year", str(year), "--json")
    assert report.returncode == 0, report.stderr
    police = next(d for d in json.loads(report.stdout)["departments"] if d["department"] == "police")
    assert police["parts_sent"] == before


@pytest.mark.parametrize("word", ["退订", " td ", "T", "stop", "STOP\n"])
def test_inbound_opt_out_word_opts_out_and_next_run_skips_the_person(sent_run: Any, word: str) -> None:
    project, run_id, rt = sent_run
    phone = rows(rt, run_id)[0].phone
    client = TestClient(create_app(rt))
    reply = signed_post(client, "/webhooks/twilio/inbound", {"From": phone, "To": FROM, "Body": word})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/xml")
    assert "<Response><Message>" in reply.text and "退订" in reply.text

    second = start(rt, project.root / "campaigns/hooks.yaml")
    row = next(r for r in rt.store.deliveries(second) if r.phone == phone)
    assert (row.state, row.reason) == ("skipped", "opted_out")


def test_start_opts_back_in_and_forged_inbound_changes_nothing(sent_run: Any) -> None:
    project, run_id, rt = sent_run
    phone = rows(rt, run_id)[0].phone
    client = TestClient(create_app(rt))
    forged = client.post(
        "/webhooks/twilio/inbound", data={"From": phone, "Body": "退订"}, headers={"X-Twilio-Signature": "x"}
    )
    assert forged.status_code == 403
    assert signed_post(client, "/webhooks/twilio/inbound", {"From": phone, "Body": "TD"}).status_code == 200
    assert signed_post(client, "/webhooks/twilio/inbound", {"From": phone, "Body": " Start "}).status_code == 200
    second = start(rt, project.root / "campaigns/hooks.yaml")
    row = next(r for r in rt.store.deliveries(second) if r.phone == phone)
    assert row.state == "pending"
    other = signed_post(client, "/webhooks/twilio/inbound", {"From": phone, "Body": "谢谢"})
    assert other.status_code == 200 and "<Message>" not in other.text


def test_delivery_report_needs_the_body_hmac_and_cannot_move_a_row_twilio_sent(sent_run: Any) -> None:
    _project, run_id, rt = sent_run
    row = rows(rt, run_id)[0]
    client = TestClient(create_app(rt))
    body = json.dumps({"reports": [{"message_id": row.provider_id, "status": "failed"}]}).encode()
    bad = client.post("/webhooks/http/report", content=body, headers={"X-Dispatch-Signature": "sha256=00"})
    assert bad.status_code == 403
    assert rt.store.provider_events.state_of(row.provider_id) == ["sent"]
    # signed with the HTTP adapter's secret: it speaks for the HTTP adapter's messages only
    signed = client.post(
        "/webhooks/http/report",
        content=body,
        headers={"X-Dispatch-Signature": report_signature(REPORT_SECRET, body)},
    )
    assert signed.status_code == 200 and signed.json() == {"reports": 1, "changed": 0}
    assert rt.store.provider_events.state_of(row.provider_id) == ["sent"]
    rt.store.provider_events.drain_status_backlog()  # kept reports replayed later do not move it either
    assert rt.store.provider_events.state_of(row.provider_id) == ["sent"]


def test_stop_from_a_number_not_in_the_registry_is_not_confirmed_as_an_opt_out(sent_run: Any) -> None:
    _project, _run_id, rt = sent_run
    client = TestClient(create_app(rt))
    reply = signed_post(client, "/webhooks/twilio/inbound", {"From": "+8613000000000", "To": FROM, "Body": "STOP"})
    assert reply.status_code == 200
    assert "您已退订" not in reply.text and "未作任何登记" in reply.text


@pytest.mark.slow
def test_dispatch_web_serves_signed_callbacks_as_a_process(sent_run: Any) -> None:
    project, run_id, rt = sent_run
    row = rows(rt, run_id)[0]
    port = free_port()
    proc = project.popen("web", "--port", str(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "dispatch web did not come up"
            time.sleep(0.2)
        params = {"MessageSid": row.provider_id, "MessageStatus": "delivered"}
        signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + "/webhooks/twilio/status", params)
        reply = httpx.post(base + "/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": signature})
        assert reply.status_code == 204
        assert rt.store.provider_events.state_of(row.provider_id) == ["delivered"]
    finally:
        proc.terminate()
        try:
            output = proc.communicate(timeout=10)[0] or ""
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0] or ""
    assert row.phone not in output and AUTH_TOKEN not in output


def test_callback_that_overtakes_the_recorded_sid_is_applied_when_the_batch_records_it(
    project: Any, twilio_peer: tuple[FakeTwilio, LocalServer]
) -> None:
    _peer, server = twilio_peer
    project.env.update(
        {
            "DISPATCH_PUBLIC_URL": PUBLIC_URL,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM": FROM,
            "DISPATCH_TWILIO_BASE_URL": server.url,
            "DISPATCH_GATEWAY": "twilio",
        }
    )
    project.registry(size=3, seed=12)
    clock = Clock()
    rt = project.runtime(clock=clock)
    client = TestClient(create_app(rt))
    first_sid = f"SM{0:032x}"  # the peer numbers its messages from 0
    # Twilio reports "delivered" before our batch has written the SID down
    early = {"MessageSid": first_sid, "MessageStatus": "delivered"}
    assert signed_post(client, "/webhooks/twilio/status", early).status_code == 204
    run_id = start(rt, project.write("campaigns/early.yaml", campaign_yaml("early")))
    drive(rt, run_id, clock)
    # recording the batch applied what was kept: no later report is needed (the last one may never come)
    assert rt.store.provider_events.state_of(first_sid) == ["delivered"]
    later = {"MessageSid": f"SM{1:032x}", "MessageStatus": "sent"}
    assert signed_post(client, "/webhooks/twilio/status", later).status_code == 204
    assert rt.store.provider_events.state_of(first_sid) == ["delivered"]
    assert [r.problem for r in verify(rt.store, run_id)] == [None]
