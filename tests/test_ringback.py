"""Ringback campaigns: enrol every eligible number for the window, serve the announcement, restore at the end.

Run against the outbox adapter, against Prism (``twilio-announce``: the real
``twilio`` client updating IncomingPhoneNumbers) and against a carrier's HTTP API
served on 127.0.0.1 (``carrier-http``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM, PrismServer, prism_server  # noqa: F401
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator
from twilio_support import Clock, LocalServer, drive, json_reply, start

from dispatcher import domain
from dispatcher.audit import verify
from dispatcher.campaigns import check_file
from dispatcher.providers.outbox.ringback import read_ringback_outbox
from dispatcher.restores import due_restores, find_restore_run, start_restore
from dispatcher.store import AudienceFilter
from dispatcher.web.app import create_app

PUBLIC_URL = "https://dispatch.example.org"


def ringback_yaml(campaign_id: str, clock: Clock, *, starts_in: timedelta = -timedelta(hours=1)) -> str:
    start = clock() + starts_in
    end = start + timedelta(days=7)
    return (
        f"id: {campaign_id}\n"
        "title: 反电诈彩铃（测试）\n"
        "owner: 公安分局\n"
        "channel: ringback\n"
        "template: themes/refund.sms.j2\n"
        "variables:\n"
        '  hotline: "96110"\n'
        "audience:\n"
        "  districts: all\n"
        "window:\n"
        f'  start: "{start.isoformat()}"\n'
        f'  end: "{end.isoformat()}"\n'
    )


def states(rt: Any, run_id: str) -> dict[str, str]:
    return {r.phone: r.state for r in rt.store.deliveries(run_id)}


def enrol_then_restore(
    project: Any, rt: Any, clock: Clock, campaign_id: str, *, cancel: bool = False
) -> tuple[str, str]:
    path = project.write(f"campaigns/{campaign_id}.yaml", ringback_yaml(campaign_id, clock))
    enrol_run = start(rt, path)
    drive(rt, enrol_run, clock)
    if cancel:
        rt.store.cancel_open(enrol_run)
    clock.advance(8 * 86400)  # past the window's end
    assert due_restores(rt) == [enrol_run]
    restore_run = start_restore(rt, enrol_run)["run_id"]
    drive(rt, restore_run, clock)
    return enrol_run, restore_run


def test_outbox_ringback_enrols_eligible_numbers_and_restores_them_even_after_cancel(
    any_db_project: Any,
) -> None:
    project = any_db_project
    project.registry(size=12, seed=21)
    clock = Clock()
    rt = project.runtime(clock=clock)
    opted = next(rt.store.iter_audience(AudienceFilter(districts=tuple(d.id for d in domain.DISTRICTS)))).phone
    rt.store.set_opted_out(opted, True)

    enrol_run, restore_run = enrol_then_restore(project, rt, clock, "rb-outbox", cancel=True)

    enrolled = states(rt, enrol_run)
    assert enrolled[opted] == "skipped"
    eligible = {p for p, s in enrolled.items() if p != opted and s != "skipped"}
    assert eligible and all(enrolled[p] == "sent" for p in eligible)
    lines = list(read_ringback_outbox(project.root / "var" / "ringback.jsonl"))
    assert sorted(line["to"] for line in lines if line["action"] == "enrol") == sorted(eligible)
    assert opted not in {line["to"] for line in lines}
    restored = states(rt, restore_run)
    assert set(restored) == eligible and set(restored.values()) == {"sent"}
    assert sorted(line["to"] for line in lines if line["action"] == "restore") == sorted(eligible)
    assert rt.store.get_run(restore_run).status == "completed"
    assert [r.problem for r in verify(rt.store, enrol_run)] == [None]
    assert [r.problem for r in verify(rt.store, restore_run)] == [None]
    # restoring again finds the same restore run and sends nothing more
    again = start_restore(rt, enrol_run)
    assert again == {"run_id": restore_run, "total": len(eligible), "batches": 0, "created": False}
    assert due_restores(rt) == []


def test_enrolment_waits_for_the_window_to_open(project: Any) -> None:
    project.registry(size=4, seed=22)
    clock = Clock()
    rt = project.runtime(clock=clock)
    path = project.write("campaigns/rb-later.yaml", ringback_yaml("rb-later", clock, starts_in=timedelta(hours=2)))
    run_id = start(rt, path)
    drive(rt, run_id, clock, rounds=1, step=60)
    assert "sent" not in states(rt, run_id).values()
    assert not (project.root / "var" / "ringback.jsonl").exists()
    clock.advance(2 * 3600)
    drive(rt, run_id, clock)
    after = states(rt, run_id)
    assert set(after.values()) <= {"sent", "skipped"}
    enrolled = {p for p, s in after.items() if s == "sent"}
    assert enrolled, "once the window opened, the eligible numbers were enrolled"
    lines = list(read_ringback_outbox(project.root / "var" / "ringback.jsonl"))
    assert sorted(line["to"] for line in lines if line["action"] == "enrol") == sorted(enrolled)


def test_ringback_campaign_without_window_is_refused_at_its_line(project: Any) -> None:
    clock = Clock()
    text = ringback_yaml("rb-bad", clock).split("window:")[0]
    path = project.write("campaigns/rb-bad.yaml", text)
    _loaded, errors = check_file(path, project.root / "templates")
    assert errors and "needs a window" in str(errors[0])
    result = project.dispatch("validate", str(path))
    assert result.returncode == 2 and "needs a window" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_twilio_announce_against_prism_points_numbers_at_our_twiml_and_puts_them_back(
    project: Any, prism: PrismServer
) -> None:
    project.env.update(
        {
            "DISPATCH_RINGBACK_GATEWAY": "twilio-announce",
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM": FROM,
            "DISPATCH_TWILIO_BASE_URL": prism.url,
            "DISPATCH_PUBLIC_URL": PUBLIC_URL,
        }
    )
    project.registry(size=5, seed=23)
    clock = Clock()
    rt = project.runtime(clock=clock)
    enrol_run, restore_run = enrol_then_restore(project, rt, clock, "rb-twilio")

    enrolled = [r for r in rt.store.deliveries(enrol_run) if r.state != "skipped"]
    assert enrolled and all(r.state == "sent" and r.provider_id.startswith("PN") for r in enrolled)
    for row in enrolled:
        trace = json.loads(rt.store.attempts_for(row.id)[-1].trace)
        update = trace[-1]
        assert update["method"] == "POST" and "/IncomingPhoneNumbers/PN" in update["url"]
        announce = update["request"]["VoiceUrl"]
        assert announce.startswith(f"{PUBLIC_URL}/twiml/ringback/rb-twilio?then=")
        kept = rt.store.ringback.ringback_kept(enrol_run, row.phone)
        assert kept is not None and kept["sid"] == row.provider_id
        assert parse_qs(urlsplit(announce).query).get("then", [""]) == [kept["voice_url"]], (announce, kept)
    restored = [r for r in rt.store.deliveries(restore_run)]
    assert {r.phone for r in restored} == {r.phone for r in enrolled}
    for row in restored:
        assert row.state == "sent"
        update = json.loads(rt.store.attempts_for(row.id)[-1].trace)[-1]
        kept_url = rt.store.ringback.ringback_kept(enrol_run, row.phone)["voice_url"]
        # Twilio's example number has no voice URL: it is restored to one that rejects calls, as before
        assert update["request"]["VoiceUrl"] == (kept_url or f"{PUBLIC_URL}/twiml/unrouted")
    assert prism.violations() == []
    assert find_restore_run(rt, enrol_run).id == restore_run

    # the announcement the number now points at: zh-CN warning, then on to the kept URL
    client = TestClient(create_app(rt))
    path = urlsplit(announce).path + "?" + urlsplit(announce).query
    signature = RequestValidator(AUTH_TOKEN).compute_signature(
        PUBLIC_URL + path, {"To": FROM, "From": "+8613800000000"}
    )
    reply = client.post(path, data={"To": FROM, "From": "+8613800000000"}, headers={"X-Twilio-Signature": signature})
    assert reply.status_code == 200
    assert '<Say language="zh-CN"' in reply.text and "电商客服" in reply.text and "回T退订" not in reply.text
    if kept["voice_url"]:
        assert f"<Redirect>{kept['voice_url']}</Redirect>" in reply.text
    else:
        assert "<Redirect>" not in reply.text  # nothing to go on to: the number had no voice URL
    forged = client.post(path, data={"To": FROM}, headers={"X-Twilio-Signature": "forged"})
    assert forged.status_code == 403


CARRIER = """\
enrol:
  url: {url}/crbt/subscribe
  headers:
    Authorization: "Bearer ${{DISPATCH_HTTP_SECRET_CRBT_TOKEN}}"
  body:
    format: json
    template: {{msisdn: "{{to}}", tone: "anti-fraud-2026", until: "{{campaign_id}}"}}
  response: {{message_id: order_id, error_code: code, success_codes: ["0"]}}
  retryable_codes: ["busy"]
restore:
  url: {url}/crbt/unsubscribe
  headers:
    Authorization: "Bearer ${{DISPATCH_HTTP_SECRET_CRBT_TOKEN}}"
  body:
    format: json
    template: {{msisdn: "{{to}}"}}
  response: {{message_id: order_id, error_code: code, success_codes: ["0"]}}
"""


class CarrierPlatform:
    """A carrier ringback platform: subscribes and unsubscribes numbers; busy once for the first number."""

    def __init__(self) -> None:
        self.subscribed: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.busy_once = True

    def __call__(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if headers.get("Authorization") != "Bearer crbt-token-3344":
            return json_reply(401, {"code": "auth"})
        number = json.loads(body)["msisdn"]
        self.calls.append((path, number))
        if path.endswith("/subscribe"):
            if self.busy_once:
                self.busy_once = False
                return json_reply(200, {"code": "busy"})
            self.subscribed.add(number)
        else:
            self.subscribed.discard(number)
        return json_reply(200, {"code": "0", "order_id": f"o{len(self.calls)}"})


def test_carrier_http_ringback_retries_and_restores_every_number(project: Any) -> None:
    platform = CarrierPlatform()
    server = LocalServer(platform)
    try:
        config = project.write("crbt.yaml", CARRIER.format(url=server.url))
        project.env.update(
            {
                "DISPATCH_RINGBACK_GATEWAY": "carrier-http",
                "DISPATCH_RINGBACK_CONFIG": str(config),
                "DISPATCH_HTTP_SECRET_CRBT_TOKEN": "crbt-token-3344",
            }
        )
        project.registry(size=6, seed=24)
        clock = Clock()
        rt = project.runtime(clock=clock)
        path = project.write("campaigns/rb-carrier.yaml", ringback_yaml("rb-carrier", clock))
        enrol_run = start(rt, path)
        drive(rt, enrol_run, clock)
        eligible = {p for p, s in states(rt, enrol_run).items() if s != "skipped"}
        assert platform.subscribed == eligible
        retried = [r for r in rt.store.deliveries(enrol_run) if r.attempts == 2]
        assert len(retried) == 1
        clock.advance(8 * 86400)
        restore_run = start_restore(rt, enrol_run)["run_id"]
        drive(rt, restore_run, clock)
        assert platform.subscribed == set()
        assert set(states(rt, restore_run).values()) == {"sent"}
        traces = [a.trace for r in rt.store.deliveries(enrol_run) for a in rt.store.attempts_for(r.id)]
        assert traces and not any("crbt-token-3344" in (t or "") for t in traces)
    finally:
        server.close()


def test_scheduler_leader_restores_numbers_once_the_window_has_ended(project: Any) -> None:
    """Nobody has to remember `dispatch ringback sweep`: the scheduler's leader starts the restore."""
    from dispatcher.scheduler import Scheduler

    project.registry(size=8, seed=22)
    clock = Clock()
    rt = project.runtime(clock=clock)
    path = project.write("campaigns/rb-sweep.yaml", ringback_yaml("rb-sweep", clock))
    enrol_run = start(rt, path)
    drive(rt, enrol_run, clock)
    scheduler = Scheduler(rt, project.root / "campaigns")
    assert scheduler.restore_ended_ringback_windows() == 0  # window still open: nothing to restore
    clock.advance(8 * 86400)
    scheduler._ringback_due_at = 0.0  # the next sweep is due now rather than in 30 s
    scheduler.tick()
    restore = find_restore_run(rt, enrol_run)
    assert restore is not None
    drive(rt, restore.id, clock)
    enrolled = {p for p, s in states(rt, enrol_run).items() if s == "sent"}
    assert enrolled, "the enrol run enrolled someone, so the restore has something to prove"
    assert set(states(rt, restore.id)) == enrolled and set(states(rt, restore.id).values()) == {"sent"}
    scheduler._ringback_due_at = 0.0
    assert scheduler.restore_ended_ringback_windows() == 0  # a repeated sweep starts nothing twice


def test_an_adapter_bug_for_one_number_leaves_that_row_unknown_and_resume_enrols_it(project: Any) -> None:
    from dispatcher.providers.outbox.ringback import OutboxRingback
    from dispatcher.runs import resume_run

    project.registry(size=6, seed=23)
    clock = Clock()
    broken: set[str] = set()

    class Flaky(OutboxRingback):
        def enrol(self, request: Any) -> Any:
            if request.phone in broken:
                raise RuntimeError(f"adapter bug for {request.phone}")
            return super().enrol(request)

    rt = project.runtime(clock=clock, ringback_factory=lambda s: Flaky(project.root / "var" / "ringback.jsonl"))
    path = project.write("campaigns/rb-flaky.yaml", ringback_yaml("rb-flaky", clock))
    run_id = start(rt, path)
    victim = sorted(p for p, s in states(rt, run_id).items() if s == "pending")[2]
    broken.add(victim)

    drive(rt, run_id, clock)

    after = states(rt, run_id)
    assert after[victim] == "unknown"
    assert all(s == "sent" for p, s in after.items() if p not in (victim,) and s != "skipped")
    row = next(r for r in rt.store.deliveries(run_id) if r.phone == victim)
    assert row.error_code == "internal_error" and victim not in (row.error_message or "")

    broken.clear()
    resume_run(rt, run_id)  # enrolment is idempotent: the row is simply done again
    drive(rt, run_id, clock)
    assert states(rt, run_id)[victim] == "sent"
    assert all(r.problem is None for r in verify(rt.store, run_id))
