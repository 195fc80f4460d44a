"""The Kannel provider: the sendsms request it builds, how it reads smsbox's answers, its DLR route.

Here the adapter runs on ``httpx.MockTransport`` playing smsbox, to reach answers a
healthy Kannel never gives; ``test_kannel_real.py`` runs it against a real Kannel. The
DLR test sends a campaign through it into the real store and calls the real web app.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.testclient import TestClient
from twilio_support import Clock, drive, start

from dispatcher.audit import verify
from dispatcher.errors import (
    AmbiguousSendError,
    ConfigError,
    PermanentSendError,
    SendError,
    UnavailableSendError,
)
from dispatcher.providers import create_gateway
from dispatcher.providers.base import OutgoingMessage
from dispatcher.providers.kannel.gateway import KannelGateway, dlr_token
from dispatcher.web.app import create_app

PASSWORD = "kannel-pass-5d1e"
DLR_SECRET = "dlr-secret-3b9c0e7a41"
PUBLIC_URL = "https://dispatch.example.org"
SENDSMS = "http://kannel.local:13013/cgi-bin/sendsms"


class RunningClock(Clock):
    """Moves a millisecond at every reading, as a real clock does between two statements."""

    def __call__(self) -> datetime:
        with self.lock:
            self.now += timedelta(milliseconds=1)
            return self.now


def message(body: str = "【常州经开区反诈中心】谨防电信诈骗", encoding: str = "UCS-2") -> OutgoingMessage:
    return OutgoingMessage(
        key="run-1:+8613800138000",
        run_id="run-1",
        campaign_id="c1",
        to="+8613800138000",
        body=body,
        parts=1,
        encoding=encoding,
    )


def gateway(answer: tuple[int, str], seen: list[httpx.Request] | None = None) -> KannelGateway:
    def reply(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(answer[0], text=answer[1])

    return KannelGateway(
        sendsms_url=SENDSMS,
        username="dispatch",
        password=PASSWORD,
        dlr_secret=DLR_SECRET,
        public_url=PUBLIC_URL,
        transport=httpx.MockTransport(reply),
    )


def test_sendsms_request_carries_credentials_ucs2_coding_and_a_dlr_url_for_every_report_type() -> None:
    seen: list[httpx.Request] = []
    result = gateway((202, "0: Accepted for delivery"), seen).send(message())
    (request,) = seen
    assert request.method == "GET" and request.url.path == "/cgi-bin/sendsms"
    query = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
    assert query["username"] == "dispatch" and query["password"] == PASSWORD
    assert query["to"] == "+8613800138000" and query["text"] == "【常州经开区反诈中心】谨防电信诈骗"
    assert query["charset"] == "UTF-8" and query["coding"] == "2" and query["dlr-mask"] == "31"
    dlr = urlsplit(query["dlr-url"])
    assert f"{dlr.scheme}://{dlr.netloc}{dlr.path}" == f"{PUBLIC_URL}/webhooks/kannel/dlr"
    assert dlr.query.endswith("&type=%d&at=%T")  # Kannel substitutes the report type and its time
    assert "%p" not in dlr.query and "%P" not in dlr.query  # numbers are never asked back
    assert parse_qs(dlr.query)["id"] == [result.provider_id]
    # neither the password nor the DLR URL's token (which would let a reader forge a report) is kept
    token = parse_qs(dlr.query)["token"][0]
    assert result.trace and PASSWORD not in repr(result.trace) and token not in repr(result.trace)
    assert "13800138000" not in repr(result.trace)


def test_gsm_text_is_sent_without_ucs2_coding() -> None:
    seen: list[httpx.Request] = []
    gateway((202, "0: Accepted for delivery"), seen).send(message("Beware of fraud calls", "GSM-7"))
    assert "coding" not in parse_qs(seen[0].url.query.decode())


@pytest.mark.parametrize("answer", ["0: Accepted for delivery", "3: Queued for later delivery"])
def test_accepted_and_queued_answers_are_hand_overs(answer: str) -> None:
    result = gateway((202, answer)).send(message())
    assert result.provider_id == "kannel:run-1:+8613800138000"


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        ((403, "Authorization failed for sendsms"), PermanentSendError, "kannel.auth"),
        ((202, "Authorization failed for sendsms"), AmbiguousSendError, "kannel.bad_provider_response"),
        ((400, "Missing receiver number, rejected"), PermanentSendError, "kannel.400"),
        ((503, "Sending failed."), UnavailableSendError, "kannel.503"),  # an explicit "not accepted"
        ((500, "Internal error"), AmbiguousSendError, "kannel.500"),
        ((202, "<html>proxy page</html>"), AmbiguousSendError, "kannel.bad_provider_response"),
    ],
)
def test_other_answers_are_classified(answer: tuple[int, str], error: type[SendError], code: str) -> None:
    with pytest.raises(error) as caught:
        gateway(answer).send(message())
    assert caught.value.code == code
    assert PASSWORD not in repr(caught.value.trace) and caught.value.trace


def test_kannel_is_chosen_by_name_from_the_registry(project: Any) -> None:
    project.env.update({"DISPATCH_GATEWAY": "kannel", "DISPATCH_PUBLIC_URL": PUBLIC_URL})
    with pytest.raises(ConfigError, match="KANNEL_URL"):
        create_gateway(project.settings())
    project.env.update(
        {
            "DISPATCH_KANNEL_URL": SENDSMS,
            "DISPATCH_KANNEL_USERNAME": "dispatch",
            "DISPATCH_KANNEL_PASSWORD": PASSWORD,
            "DISPATCH_KANNEL_DLR_SECRET": "short",
        }
    )
    with pytest.raises(ConfigError, match="DISPATCH_KANNEL_DLR_SECRET"):
        create_gateway(project.settings())
    project.env["DISPATCH_KANNEL_DLR_SECRET"] = DLR_SECRET
    settings = project.settings()
    assert PASSWORD not in repr(settings) and DLR_SECRET not in repr(settings)
    built = create_gateway(settings)
    try:
        assert isinstance(built, KannelGateway) and not built.can_lookup
    finally:
        built.close()


def test_dlr_types_move_the_row_only_to_final_states_and_forged_reports_change_nothing(project: Any) -> None:
    """Reports arrive while the clock runs: each change is in the ledger at the instant of its attempt row."""
    seen: list[httpx.Request] = []
    project.env.update(
        {
            "DISPATCH_GATEWAY": "kannel",
            "DISPATCH_PUBLIC_URL": PUBLIC_URL,
            "DISPATCH_KANNEL_URL": SENDSMS,
            "DISPATCH_KANNEL_USERNAME": "dispatch",
            "DISPATCH_KANNEL_PASSWORD": PASSWORD,
            "DISPATCH_KANNEL_DLR_SECRET": DLR_SECRET,
        }
    )
    project.registry(size=3, seed=21)
    project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
    clock = RunningClock()
    rt = project.runtime(clock=clock, gateway_factory=lambda s: gateway((202, "0: Accepted for delivery"), seen))
    path = project.write(
        "campaigns/plain.yaml",
        "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
    )
    run_id = start(rt, path)
    drive(rt, run_id, clock)
    rows = [r for r in rt.store.deliveries(run_id) if r.provider_id]
    assert rows and len(seen) == len(rows)
    # what smsbox would call: the DLR URL of the send with %d substituted
    urls = {}
    for request in seen:
        dlr_url = parse_qs(request.url.query.decode())["dlr-url"][0]
        urls[parse_qs(urlsplit(dlr_url).query)["id"][0]] = urlsplit(dlr_url)
    client = TestClient(create_app(rt))

    def report(provider_id: str, kind: str, *, token: str | None = None) -> httpx.Response:
        target = urls[provider_id]
        query = target.query.replace("%d", kind).replace("%T", "1795916726")
        if token is not None:
            query = query.split("&token=")[0] + f"&token={token}&type={kind}"
        return client.get(f"{target.path}?{query}")

    first = rows[0].provider_id
    assert report(first, "8").status_code == 200  # delivered to the SMSC: not final
    assert rt.store.provider_events.state_of(first) == ["sent"]
    assert report(first, "4").status_code == 200  # buffered on the SMSC: not final either
    assert rt.store.provider_events.state_of(first) == ["sent"]
    assert report(first, "1", token="0" * 64).status_code == 403
    assert rt.store.provider_events.state_of(first) == ["sent"]
    assert report(first, "1").status_code == 200
    assert rt.store.provider_events.state_of(first) == ["delivered"]
    if len(rows) > 1:
        second = rows[1].provider_id
        assert report(second, "16").status_code == 200
        assert rt.store.provider_events.state_of(second) == ["failed"]
    assert [r.problem for r in verify(rt.store, run_id)] == [None]


def test_a_kannel_report_cannot_move_a_row_another_gateway_sent(project: Any) -> None:
    project.env.update({"DISPATCH_PUBLIC_URL": PUBLIC_URL, "DISPATCH_KANNEL_DLR_SECRET": DLR_SECRET})
    project.registry(size=3, seed=22)
    project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
    clock = Clock()
    rt = project.runtime(clock=clock)  # the outbox gateway
    path = project.write(
        "campaigns/plain.yaml",
        "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
    )
    run_id = start(rt, path)
    drive(rt, run_id, clock)
    row = next(r for r in rt.store.deliveries(run_id) if r.provider_id)
    assert row.gateway == "outbox" and row.state == "sent"
    # even with a valid token for that id (the secret leaked, or an id collided), Kannel speaks only for its own rows
    query = httpx.QueryParams({"id": row.provider_id, "token": dlr_token(DLR_SECRET, row.provider_id)})
    answer = TestClient(create_app(rt)).get(f"/webhooks/kannel/dlr?{query}&type=1&at=1795916726")
    assert answer.status_code == 200
    assert rt.store.provider_events.state_of(row.provider_id) == ["sent"]
