"""The Twilio adapter: the real ``twilio`` client against Prism (Twilio's own schema) and small local peers.

Prism answers every request it finds valid with an example and every invalid one
with 422, so a run through Prism checks that what we send is what Twilio accepts.
The ``Prefer`` header selects Twilio-shaped error examples per recipient.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from gateway_harness import Case, Exchange, Failed, Sent, message, no_real_network, run_case
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM, PrismServer, free_port, prism_server  # noqa: F401
from twilio.base.exceptions import TwilioServiceException
from twilio_support import Clock, FakeTwilio, LocalServer, campaign_yaml, drive, json_reply, start

from dispatcher.audit import verify
from dispatcher.errors import (
    AmbiguousSendError,
    ConfigError,
    PermanentSendError,
    RetryableSendError,
    UnavailableSendError,
)
from dispatcher.providers import create_gateway
from dispatcher.providers.base import LookupRequest, OutgoingMessage
from dispatcher.providers.httptrace import collecting
from dispatcher.providers.twilio.gateway import TwilioGateway, classify
from dispatcher.runs import resume_run

SID_RE = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")
PUBLIC_URL = "https://dispatch.example.org"


class Scenario:
    """Per-recipient Prism examples: ``Prefer`` for the first ``times`` sends to a number, dynamic after."""

    def __init__(self) -> None:
        self.plan: dict[str, tuple[str, int]] = {}
        self.seen: dict[str, int] = {}

    def set(self, phone: str, prefer: str, times: int = 1_000) -> None:
        self.plan[phone] = (prefer, times)

    def __call__(self, method: str, url: str, data: Mapping[str, Any] | None) -> dict[str, str]:
        to = str((data or {}).get("To", ""))
        if method.upper() == "POST" and to:
            n = self.seen[to] = self.seen.get(to, 0) + 1
            prefer, times = self.plan.get(to, ("", 0))
            if prefer and n <= times:
                return {"Prefer": prefer}
        # dynamic examples give every created message its own SID
        return {"Prefer": "dynamic=true"}


def gateway_for(base_url: str, scenario: Scenario | None = None, **kwargs: Any) -> TwilioGateway:
    return TwilioGateway(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_=FROM,
        public_url=PUBLIC_URL,
        base_url=base_url,
        extra_headers=scenario,
        **kwargs,
    )


def opted_out(rt: Any, phone: str) -> bool:
    from dispatcher.store import schema

    with rt.store.engine.connect() as conn:
        return bool(
            conn.execute(sa.select(schema.residents.c.opted_out).where(schema.residents.c.phone == phone)).scalar_one()
        )


def all_traces(rt: Any, run_id: str) -> list[dict[str, Any]]:
    out = []
    for row in rt.store.deliveries(run_id):
        for attempt in rt.store.attempts_for(row.id):
            out.extend(json.loads(attempt.trace) if attempt.trace else [])
    return out


@pytest.mark.slow
def test_campaign_through_prism_holds_sids_and_follows_twilio_error_semantics(project: Any, prism: PrismServer) -> None:
    project.registry(size=30, seed=3)
    clock = Clock()
    scenario = Scenario()
    send_by = clock() + timedelta(hours=2)
    rt = project.runtime(clock=clock, gateway_factory=lambda s: gateway_for(prism.url, scenario, clock=clock))
    path = project.write("campaigns/twilio-contract.yaml", campaign_yaml("twilio-contract", send_by=send_by))
    run_id = start(rt, path)
    rows = [r for r in rt.store.deliveries(run_id) if r.state == "pending"]
    invalid, unsubscribed, limited = rows[0].phone, rows[1].phone, rows[2].phone
    scenario.set(invalid, "code=400, example=invalidTo")
    scenario.set(unsubscribed, "code=400, example=unsubscribed")
    scenario.set(limited, "code=429, example=tooMany", times=1)

    counts = drive(rt, run_id, clock)

    by_phone = {r.phone: r for r in rt.store.deliveries(run_id)}
    assert by_phone[invalid].state == "failed" and by_phone[invalid].error_code == "twilio.21211"
    assert by_phone[invalid].attempts == 1
    assert by_phone[unsubscribed].state == "failed" and by_phone[unsubscribed].error_code == "twilio.21610"
    assert opted_out(rt, unsubscribed) and not opted_out(rt, invalid)
    limited_attempts = rt.store.attempts_for(by_phone[limited].id)
    assert [a.outcome for a in limited_attempts] == ["retry", "sent"]
    assert by_phone[limited].state == "sent"
    assert counts == {
        "sent": len(rows) - 2,
        "failed": 2,
        **({"skipped": counts["skipped"]} if "skipped" in counts else {}),
    }
    # every sent row holds the SID Twilio (Prism) returned for that very request
    for row in by_phone.values():
        if row.state != "sent":
            continue
        assert SID_RE.match(row.provider_id), row.provider_id
        last = rt.store.attempts_for(row.id)[-1]
        trace = json.loads(last.trace)
        assert trace[-1]["response"]["sid"] == row.provider_id
        sent = trace[-1]["request"]
        assert sent["StatusCallback"] == f"{PUBLIC_URL}/webhooks/twilio/status"
        assert 1 <= int(sent["ValidityPeriod"]) <= 7200  # never beyond send_by
    traces = all_traces(rt, run_id)
    assert traces and all(t["status"] != 422 for t in traces)
    assert prism.violations() == []
    blob = json.dumps(traces, ensure_ascii=False)
    assert AUTH_TOKEN not in blob and ACCOUNT_SID not in blob
    assert not any(phone in blob for phone in by_phone)


def test_opted_out_number_from_21610_is_recorded_in_the_registry(project: Any, prism: PrismServer) -> None:
    project.registry(size=5, seed=4)
    clock = Clock()
    scenario = Scenario()
    rt = project.runtime(clock=clock, gateway_factory=lambda s: gateway_for(prism.url, scenario, clock=clock))
    path = project.write("campaigns/twilio-optout.yaml", campaign_yaml("twilio-optout"))
    run_id = start(rt, path)
    first = next(r for r in rt.store.deliveries(run_id) if r.state == "pending").phone
    scenario.set(first, "code=400, example=unsubscribed")
    drive(rt, run_id, clock)
    second_run = start(rt, path)
    row = next(r for r in rt.store.deliveries(second_run) if r.phone == first)
    assert (row.state, row.reason) == ("skipped", "opted_out")


def test_lookup_request_passes_twilio_schema(prism: PrismServer) -> None:
    gateway = gateway_for(prism.url)
    since = datetime.now(UTC) - timedelta(minutes=5)
    with collecting() as trace:
        found = gateway.lookup([LookupRequest("k1", "+8613800000001", "text", since)])
    assert found == {}  # Prism's example lists messages to another number
    assert [(t["method"], t["status"]) for t in trace] == [("GET", 200)]
    assert "**********0001" in trace[0]["url"] and "+8613800000001" not in trace[0]["url"]
    assert prism.violations() == []
    gateway.close()


def _message(to: str, send_by: datetime | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        key=f"r1:{to}",
        run_id="r1",
        campaign_id="c",
        to=to,
        body="【测试】反诈提醒",
        parts=1,
        encoding="UCS-2",
        send_by=send_by,
    )


def test_refused_connection_is_retryable_because_nothing_was_sent() -> None:
    gateway = gateway_for(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RetryableSendError) as caught:
        gateway.send(_message("+8613800000009"))
    assert caught.value.code == "twilio.connect"
    assert caught.value.trace and caught.value.trace[0]["status"] is None


def test_read_timeout_is_ambiguous_not_retried() -> None:
    def slow(method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        time.sleep(1.5)
        return json_reply(201, {"sid": "SM" + "0" * 32, "status": "queued"})

    server = LocalServer(slow)
    try:
        gateway = gateway_for(server.url, timeout=0.5)
        with pytest.raises(AmbiguousSendError) as caught:
            gateway.send(_message("+8613800000008"))
        assert caught.value.code == "twilio.timeout"
        assert len(server.calls) == 1
    finally:
        server.close()


def test_ambiguous_reply_leaves_row_unknown_and_resume_reconciles_without_resending(project: Any) -> None:
    project.registry(size=4, seed=5)
    clock = Clock()
    path = project.write("campaigns/twilio-ambiguous.yaml", campaign_yaml("twilio-ambiguous"))
    peer = FakeTwilio(set(), set())
    server = LocalServer(peer)
    try:
        rt = project.runtime(clock=clock, gateway_factory=lambda s: gateway_for(server.url))
        run_id = start(rt, path)
        phones = [r.phone for r in rt.store.deliveries(run_id) if r.state == "pending"]
        went_out, never_arrived = phones[0], phones[1]
        peer.fail_after_store.add(went_out)
        peer.fail_before_store.add(never_arrived)
        drive(rt, run_id, clock, rounds=1)
        states = {r.phone: r.state for r in rt.store.deliveries(run_id)}
        assert states[went_out] == "unknown" and states[never_arrived] == "unknown"
        posts_before = peer.posts

        result = resume_run(rt, run_id)  # reconciles unknown rows by listing messages to each number
        assert result["already_sent"] == 1 and result["requeued"] == 1
        assert peer.posts == posts_before  # the reconciliation itself sent nothing
        drive(rt, run_id, clock)
        rows = {r.phone: r for r in rt.store.deliveries(run_id)}
        stored = {m["to"]: m["sid"] for m in peer.messages}
        assert rows[went_out].state == "sent" and rows[went_out].provider_id == stored[went_out]
        assert sum(1 for m in peer.messages if m["to"] == went_out) == 1  # never sent twice
        assert rows[never_arrived].state == "sent" and rows[never_arrived].provider_id == stored[never_arrived]
        assert [r.problem for r in verify(rt.store, run_id)] == [None]  # reconciliation is in the ledger
    finally:
        server.close()


def test_service_exception_is_translated_not_leaked() -> None:
    problem = TwilioServiceException("about:blank", "Too Many Requests", 429, 20429)
    assert isinstance(classify(problem), RetryableSendError)
    unavailable = TwilioServiceException("about:blank", "Unavailable", 503, 20503)
    assert isinstance(classify(unavailable), AmbiguousSendError)
    optout = TwilioServiceException("about:blank", "Unsubscribed", 400, 21610)
    error = classify(optout)
    assert isinstance(error, PermanentSendError) and error.opt_out


def test_missing_credentials_are_a_config_error(project: Any) -> None:
    with pytest.raises(ConfigError, match="TWILIO_ACCOUNT_SID"):
        create_gateway(project.settings(DISPATCH_GATEWAY="twilio"))
    result = project.dispatch("run", "campaigns/refund-scam-lucheng.yaml", env={"DISPATCH_GATEWAY": "twilio"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "TWILIO_ACCOUNT_SID" in result.stderr.strip().splitlines()[-1]


def test_retry_that_would_land_after_send_by_expires_the_row(project: Any, prism: PrismServer) -> None:
    project.registry(size=3, seed=6)
    clock = Clock()
    scenario = Scenario()
    rt = project.runtime(clock=clock, gateway_factory=lambda s: gateway_for(prism.url, scenario, clock=clock))
    path = project.write(
        "campaigns/twilio-deadline.yaml",
        campaign_yaml("twilio-deadline", send_by=clock() + timedelta(milliseconds=400)),
    )
    run_id = start(rt, path)
    for row in rt.store.deliveries(run_id):
        scenario.set(row.phone, "code=429, example=tooMany")
    drive(rt, run_id, clock, rounds=1)
    rows = [r for r in rt.store.deliveries(run_id) if r.reason != "opted_out"]
    assert rows and all((r.state, r.reason) == ("expired", "send_by_passed") for r in rows)
    assert all(r.attempts == 1 for r in rows)


# --------------------------------------------------------------------------- the classification table


MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
TO = "+8613912345678"


def _twilio_error(status: int, code: int, text: str) -> Exchange:
    return Exchange("POST", MESSAGES_PATH, status, {"code": code, "message": text, "status": status})


def _twilio_case(label: str, exchange: Exchange, want: Sent | Failed) -> Case:
    return Case(label, [message(TO)], [exchange], [want])


TWILIO_TABLE = [
    _twilio_case(
        "created",
        Exchange(
            "POST",
            MESSAGES_PATH,
            201,
            {"sid": "SM" + "a" * 32, "status": "queued", "to": TO},
            request_has={"To": TO, "From": FROM, "StatusCallback": f"{PUBLIC_URL}/webhooks/twilio/status"},
            request_lacks=("ValidityPeriod",),
        ),
        Sent("SM" + "a" * 32),
    ),
    _twilio_case(
        "invalid number",
        _twilio_error(400, 21211, "Invalid 'To' Phone Number"),
        Failed(PermanentSendError, "twilio.21211"),
    ),
    _twilio_case(
        "not mobile",
        _twilio_error(400, 21614, "not a mobile number"),
        Failed(PermanentSendError, "twilio.21614"),
    ),
    _twilio_case(
        "no permission",
        _twilio_error(400, 21606, "From cannot send"),
        Failed(PermanentSendError, "twilio.21606"),
    ),
    _twilio_case("unverified", _twilio_error(400, 21608, "unverified"), Failed(PermanentSendError, "twilio.21608")),
    _twilio_case("cannot route", _twilio_error(400, 21612, "cannot route"), Failed(PermanentSendError, "twilio.21612")),
    _twilio_case(
        "replied STOP",
        _twilio_error(400, 21610, "unsubscribed"),
        Failed(PermanentSendError, "twilio.21610", opt_out=True),
    ),
    _twilio_case(
        "rate limited",
        _twilio_error(429, 20429, "Too Many Requests"),
        Failed(RetryableSendError, "twilio.20429"),
    ),
    _twilio_case("queue full", _twilio_error(400, 21611, "queue full"), Failed(RetryableSendError, "twilio.21611")),
    _twilio_case("server error", _twilio_error(500, 20500, "Internal"), Failed(AmbiguousSendError, "twilio.20500")),
    _twilio_case("unavailable", _twilio_error(503, 20503, "Unavailable"), Failed(AmbiguousSendError, "twilio.20503")),
    _twilio_case(
        "bad credentials",
        _twilio_error(401, 20003, "Authenticate"),
        Failed(PermanentSendError, "twilio.20003"),
    ),
    _twilio_case(
        "refused",
        Exchange("POST", MESSAGES_PATH, raise_=httpx.ConnectError),
        Failed(UnavailableSendError, "twilio.connect"),  # Twilio took nothing: another provider may
    ),
    _twilio_case(
        "read timeout",
        Exchange("POST", MESSAGES_PATH, raise_=httpx.ReadTimeout),
        Failed(AmbiguousSendError, "twilio.timeout"),
    ),
    _twilio_case(
        "reset after sending",
        Exchange("POST", MESSAGES_PATH, raise_=httpx.RemoteProtocolError),
        Failed(AmbiguousSendError, "twilio.timeout"),
    ),
]


@pytest.mark.parametrize("case", TWILIO_TABLE, ids=lambda c: c.label)
def test_twilio_classification_table(case: Case) -> None:
    def make(transport: httpx.MockTransport) -> TwilioGateway:
        return TwilioGateway(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_=FROM,
            public_url=PUBLIC_URL,
            transport=transport,
        )

    run_case(make, case, secrets=[AUTH_TOKEN, ACCOUNT_SID])


def test_validity_period_never_outlasts_send_by() -> None:
    clock = Clock()
    send_by = clock() + timedelta(minutes=10)
    case = Case(
        "validity",
        [
            OutgoingMessage(
                key="k",
                run_id="r",
                campaign_id="c",
                to=TO,
                body="x",
                parts=1,
                encoding="GSM-7",
                send_by=send_by,
            )
        ],
        [
            Exchange(
                "POST",
                MESSAGES_PATH,
                201,
                {"sid": "SM" + "b" * 32, "status": "queued"},
                request_has={"ValidityPeriod": "600"},
            )
        ],
        [Sent("SM" + "b" * 32)],
    )

    def make(transport: httpx.MockTransport) -> TwilioGateway:
        return TwilioGateway(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_=FROM,
            public_url=PUBLIC_URL,
            transport=transport,
            clock=clock,
        )

    run_case(make, case, secrets=[AUTH_TOKEN])


def test_error_message_quoting_the_number_is_masked_before_it_is_stored() -> None:
    reply = {"code": 21211, "message": f"The 'To' number {TO} is not a valid phone number.", "status": 400}
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=reply))
    gateway = TwilioGateway(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_=FROM, public_url=PUBLIC_URL, transport=transport
    )
    with no_real_network(), pytest.raises(PermanentSendError) as caught:
        gateway.send(message(TO))
    assert TO not in caught.value.message and "**********5678" in caught.value.message
    assert TO not in json.dumps(caught.value.trace, ensure_ascii=False)
