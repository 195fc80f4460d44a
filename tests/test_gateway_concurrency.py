"""Network gateways drive a chunk's requests concurrently, with every guarantee of one at a time.

Against real local HTTP servers (a Twilio-shaped one answering after a delay and counting the
requests it holds at once, and a batch-capable carrier): each message's answer is classified and
returned in its row's place; the provider never holds more than DISPATCH_GATEWAY_CONCURRENCY
requests; a pause mid-batch stops the requests; a gateway gone down hands back exactly what was
handed over; equal texts go in one carrier call under the rate limiter; and ``dispatch preview``
shows what personalising costs in calls and parts.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import pytest
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM
from twilio_support import Clock, LocalServer, campaign_yaml, drive, json_reply, start

from dispatcher.errors import AmbiguousSendError, GatewayDown, PermanentSendError, RetryableSendError, SendError
from dispatcher.providers.base import Handover, OutgoingMessage, SendResult
from dispatcher.providers.twilio.gateway import TwilioGateway
from dispatcher.runs import pause_run, resume_run
from dispatcher.sender import process_batch
from dispatcher.templates import SAMPLE_RECIPIENT

# they count the requests in flight and what leaves before a pause or a failure takes effect: timings that
# another test sharing the machine could stretch
pytestmark = pytest.mark.slow

PUBLIC_URL = "https://dispatch.example.org"


class SlowTwilio:
    """Twilio's Messages endpoint answering after ``delay``; ``answers`` picks a reply per ``To`` number.

    Counts requests per number and the most it ever held at once (each request has its own thread).
    """

    def __init__(self, delay: float = 0.1, answers: Mapping[str, str] | None = None, silent_for: float = 0.9) -> None:
        self.delay = delay
        self.silent_for = silent_for
        self.answers = dict(answers or {})
        self.per_to: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.lock = threading.Lock()
        #: called (outside the lock) after each answered request with the count so far
        self.after: Any = None

    def __call__(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict, bytes]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        to = form.get("To", "")
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.per_to[to] = self.per_to.get(to, 0) + 1
        answer = self.answers.get(to, "201")
        try:
            # a request the client gives up on stops counting just before its timeout: the client then
            # holds a connection for it no longer, and the next request may start
            time.sleep(self.silent_for if answer == "timeout" else self.delay)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.requests += 1
                count = self.requests
        if answer == "timeout":
            time.sleep(0.5)  # past the client's timeout: it has gone
        if self.after is not None:
            self.after(count)
        if answer == "429":
            return json_reply(429, {"code": 20429, "message": "Too Many Requests", "status": 429})
        if answer == "400":
            return json_reply(400, {"code": 21211, "message": "The 'To' number is not valid.", "status": 400})
        if answer == "500":
            return json_reply(500, {"code": 20500, "message": "Internal Server Error", "status": 500})
        sid = "SM" + to.lstrip("+").rjust(32, "0")  # the SID names the number: a mix-up of rows shows
        return json_reply(
            201,
            {"sid": sid, "to": to, "from": form.get("From"), "body": form.get("Body"), "status": "queued",
             "account_sid": ACCOUNT_SID, "direction": "outbound-api"},
        )  # fmt: skip

    def sent_twice(self) -> int:
        return sum(1 for n in self.per_to.values() if n > 1)


def twilio(url: str, concurrency: int, timeout: float = 10.0) -> TwilioGateway:
    return TwilioGateway(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_=FROM,
        public_url=PUBLIC_URL,
        base_url=url,
        timeout=timeout,
        concurrency=concurrency,
    )


def message(to: str, body: str = "【常州经开区反诈中心】警惕冒充客服退款诈骗。回T退订") -> OutgoingMessage:
    return OutgoingMessage(
        key=f"run-1:{to}", run_id="run-1", campaign_id="c", to=to, body=body, parts=1, encoding="UCS-2"
    )


def test_a_concurrent_twilio_batch_answers_every_row_in_its_place() -> None:
    """201, 429, 400, 500 and a read timeout, interleaved over 20 numbers sent 4 at a time: each row gets
    its own number's answer, classified as one at a time would (sent, retry, fail, unknown, unknown)."""
    kinds = ["201", "429", "400", "500", "timeout"]
    numbers = [f"+86138000{n:05d}" for n in range(20)]
    answers = {to: kinds[i % len(kinds)] for i, to in enumerate(numbers)}
    provider = SlowTwilio(delay=0.1, answers=answers)
    server = LocalServer(provider)
    gateway = twilio(server.url, concurrency=4, timeout=1.0)
    try:
        results = gateway.send_many([message(to) for to in numbers])
    finally:
        gateway.close()
        server.close()
    assert len(results) == len(numbers)
    for to, result in zip(numbers, results, strict=True):
        kind = answers[to]
        if kind == "201":
            assert isinstance(result, SendResult) and result.provider_id == "SM" + to.lstrip("+").rjust(32, "0")
            assert result.trace and result.trace[-1]["response"]["sid"] == result.provider_id
            continue
        assert isinstance(result, SendError), (to, kind, result)
        assert result.trace, "each error carries its own exchange"
        if kind == "429":
            assert isinstance(result, RetryableSendError) and result.retryable and result.code == "twilio.20429"
        elif kind == "400":
            assert isinstance(result, PermanentSendError) and not result.retryable and result.code == "twilio.21211"
        elif kind == "500":
            assert isinstance(result, AmbiguousSendError) and result.code == "twilio.20500"
        else:
            assert isinstance(result, AmbiguousSendError) and result.code == "twilio.timeout"
    assert 1 < provider.max_in_flight <= 4
    assert provider.sent_twice() == 0 and len(provider.per_to) == len(numbers)


def test_a_gateway_down_mid_chunk_hands_back_what_was_handed_over_and_starts_nothing_after() -> None:
    """The provider's side goes away at one message while others are in flight: those in flight finish
    and are answered; nothing is started after; ``done`` covers every message whose send completed."""
    started: list[int] = []
    lock = threading.Lock()

    def send(item: int) -> str:
        with lock:
            started.append(item)
        if item == 5:
            raise GatewayDown("outbox cannot be written")
        time.sleep(0.05)
        return f"id-{item}"

    handover = Handover(3, "test")
    try:
        handover.run(send, list(range(30)))
    except GatewayDown as exc:
        done = exc.done
    else:
        raise AssertionError("the stop must reach the caller")
    finally:
        handover.close()
    completed = {i for i in started if i != 5}
    assert 5 in started and len(started) < 30, "messages after the stop are never started"
    assert len(done) == max(completed) + 1  # up to the last one whose send completed
    for i, answer in enumerate(done):
        if i in completed:
            assert answer == f"id-{i}"
        else:  # never handed over (or the one that found the gateway down): retried, nothing was sent
            assert isinstance(answer, SendError) and answer.code == "gateway.down" and answer.retryable


def _twilio_project(project: Any, server: LocalServer, concurrency: int) -> Any:
    project.env.update({"DISPATCH_GATEWAY_CONCURRENCY": str(concurrency), "DISPATCH_RATE_LIMIT": "1000"})
    return project.runtime(
        clock=Clock(), gateway_factory=lambda s: twilio(server.url, concurrency=s.gateway_concurrency)
    )


def test_the_provider_sees_at_most_the_configured_requests_in_flight_through_a_run(project: Any) -> None:
    project.registry(size=40, seed=31)
    provider = SlowTwilio(delay=0.05)
    server = LocalServer(provider)
    try:
        rt = _twilio_project(project, server, concurrency=5)
        run_id = start(rt, project.write("campaigns/concurrent.yaml", campaign_yaml("concurrent")))
        counts = drive(rt, run_id, rt.clock)
    finally:
        server.close()
    assert counts["sent"] == provider.requests == len(provider.per_to)
    assert 1 < provider.max_in_flight <= 5
    assert provider.sent_twice() == 0


def test_pausing_a_run_mid_batch_stops_further_requests_and_resume_sends_the_rest_once(project: Any) -> None:
    project.registry(size=120, seed=32)
    provider = SlowTwilio(delay=0.05)
    server = LocalServer(provider)
    try:
        rt = _twilio_project(project, server, concurrency=4)
        run_id = start(rt, project.write("campaigns/paused.yaml", campaign_yaml("paused")))
        pending = sum(1 for r in rt.store.deliveries(run_id) if r.state == "pending")
        assert rt.store.get_run(run_id).batches == 1
        paused = threading.Event()

        def pause_after_eight(count: int) -> None:
            if count >= 8 and not paused.is_set():
                paused.set()
                pause_run(rt, run_id)

        provider.after = pause_after_eight
        process_batch(rt, run_id, 0)
        at_pause = provider.requests
        counts = rt.store.counts(run_id)
        # the gate reads the run's status every quarter second: a few chunks of 4 may still leave
        assert 8 <= at_pause < pending / 2
        assert counts["sent"] == at_pause and counts["pending"] == pending - at_pause
        time.sleep(0.3)
        assert provider.requests == at_pause, "nothing is sent while the run is paused"

        provider.after = None
        resume_run(rt, run_id)
        counts = drive(rt, run_id, rt.clock)
    finally:
        server.close()
    assert counts["sent"] == pending == provider.requests
    assert provider.sent_twice() == 0


# ------------------------------------------------------------------ the carrier's batch mode

TOKEN = "carrier-token-5d1e77a0"
BATCH = """\
url: {url}/v2/batch
headers:
  Authorization: "Bearer ${{DISPATCH_HTTP_SECRET_CARRIER_TOKEN}}"
body:
  format: json
  template:
    mobiles: "{{to_list}}"
    content: "{{body}}"
response:
  message_id: data.batch_id
  error_code: code
  success_codes: ["0"]
batch:
  max_size: 500
  results: data.results
  result_to: mobile
  result_message_id: msgid
  result_error_code: code
"""


class Carrier:
    """A batch-capable carrier: one JSON call carries one text for many numbers, answered per number."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict, bytes]:
        data = json.loads(body)
        with self.lock:
            self.texts.append((data["content"], len(data["mobiles"])))
            call = len(self.texts)
        results = [{"mobile": m, "code": 0, "msgid": f"{call}-{i}"} for i, m in enumerate(data["mobiles"])]
        return json_reply(200, {"code": 0, "data": {"batch_id": f"b{call}", "results": results}})


def _carrier_project(project: Any, server: LocalServer, template: str) -> Any:
    project.write("gateway.yaml", BATCH.format(url=server.url))
    project.write("templates/local.sms.j2", template)
    project.env.update(
        {
            "DISPATCH_GATEWAY": "http",
            "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml"),
            "DISPATCH_HTTP_SECRET_CARRIER_TOKEN": TOKEN,
            # paced: the limiter once made every chunk a single message, and so every call one number
            "DISPATCH_RATE_LIMIT": "5000",
        }
    )
    return project.write(
        "campaigns/local.yaml",
        textwrap.dedent("""\
            id: local
            title: 统一提醒
            owner: 公安分局
            template: local.sms.j2
            audience:
              districts: all
        """),
    )


def test_equal_texts_go_in_one_carrier_call_under_the_rate_limiter(project: Any) -> None:
    project.registry(size=200, seed=33)
    carrier = Carrier()
    server = LocalServer(carrier)
    try:
        path = _carrier_project(project, server, "请警惕冒充{{ recipient.district }}客服退款诈骗，核实请拨96110。")
        clock = Clock()
        rt = project.runtime(clock=clock)
        run_id = start(rt, path)
        rows = [r for r in rt.store.deliveries(run_id) if r.state == "pending"]
        counts = drive(rt, run_id, clock)
    finally:
        server.close()
    districts = {r.district for r in rows}
    batches = rt.store.get_run(run_id).batches
    assert counts["sent"] == len(rows) == sum(n for _, n in carrier.texts)
    # one call per district's text per batch, never one per person
    assert len(carrier.texts) <= len(districts) * batches < len(rows) / 5
    assert len({t for t, _ in carrier.texts}) == len(districts)


def test_preview_shows_what_the_name_costs_in_calls_and_parts(project: Any) -> None:
    project.registry(size=300, seed=34)
    server = LocalServer(Carrier())
    body = "您好：自称“电商客服”说商品有质量问题要退款、理赔的，都是诈骗！核实请拨96110。"
    try:
        path = _carrier_project(project, server, "{{ recipient.name }}" + body)
        sample = json.loads(project.dispatch("preview", str(path), "--json").stdout)["variants"][0]
        # pad the warning so that without a name it fills two parts exactly (2 x 67 UCS-2 characters):
        # any name then costs a third part
        unnamed = sample["chars"] - len(SAMPLE_RECIPIENT["name"])
        filler = ("请提高警惕，" * 40)[: 2 * 67 - unnamed]
        project.write("templates/local.sms.j2", "{{ recipient.name }}" + body.replace("核实", filler + "核实"))
        shown = project.dispatch("preview", str(path), "--json")
        text = project.dispatch("preview", str(path))
    finally:
        server.close()
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    cost = report["personalising"]
    recipients = report["recipients"]
    assert cost["texts"] == recipients and cost["numbers_per_call"] == 500
    # a name first makes nearly every text different: about a call per person
    assert cost["distinct_texts"] > recipients * 0.8 and cost["calls"] >= cost["distinct_texts"]
    # without it, one text: one call per batch of rows
    assert cost["without_name"]["distinct_texts"] == 1 and cost["without_name"]["calls"] <= 2
    # the name pushes every text over the boundary of two parts
    assert cost["without_name"]["parts"] == 2 * recipients
    assert cost["parts"] == report["total_parts"] == 3 * recipients
    assert text.returncode == 0, text.stderr
    line = f"personalised: {recipients:,} texts in {cost['calls']:,} calls, {cost['parts']:,} parts"
    assert line in text.stdout
    assert f"the same warning without the name: {cost['without_name']['calls']:,} calls" in text.stdout


# ------------------------------------------------------------------ carrier-http ringback

CRBT = """\
enrol:
  url: {url}/crbt/subscribe
  body:
    format: json
    template: {{msisdn: "{{to}}", tone: "anti-fraud-2026"}}
  response: {{message_id: order_id, error_code: code, success_codes: ["0"]}}
restore:
  url: {url}/crbt/unsubscribe
  body:
    format: json
    template: {{msisdn: "{{to}}"}}
  response: {{message_id: order_id, error_code: code, success_codes: ["0"]}}
"""


class SlowPlatform:
    """A carrier's ringback platform answering after a delay, counting the calls it holds at once."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.subscribed: dict[str, int] = {}
        self.unsubscribed: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict, bytes]:
        number = json.loads(body)["msisdn"]
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
            seen = self.subscribed if path.endswith("/subscribe") else self.unsubscribed
            seen[number] = seen.get(number, 0) + 1
        return json_reply(200, {"code": "0", "order_id": f"o-{number[-4:]}-{path.rsplit('/', 1)[1]}"})


def test_carrier_ringback_enrols_and_restores_numbers_concurrently_each_once(project: Any) -> None:
    from test_ringback import ringback_yaml, states

    from dispatcher.restores import start_restore

    platform = SlowPlatform()
    server = LocalServer(platform)
    try:
        config = project.write("crbt.yaml", CRBT.format(url=server.url))
        project.env.update(
            {
                "DISPATCH_RINGBACK_GATEWAY": "carrier-http",
                "DISPATCH_RINGBACK_CONFIG": str(config),
                "DISPATCH_GATEWAY_CONCURRENCY": "4",
            }
        )
        project.registry(size=40, seed=35)
        clock = Clock()
        rt = project.runtime(clock=clock)
        enrol_run = start(rt, project.write("campaigns/rb-many.yaml", ringback_yaml("rb-many", clock)))
        drive(rt, enrol_run, clock)
        enrolled = {p for p, s in states(rt, enrol_run).items() if s == "sent"}
        clock.advance(8 * 86400)
        restore_run = start_restore(rt, enrol_run)["run_id"]
        drive(rt, restore_run, clock)
    finally:
        server.close()
    assert enrolled and set(platform.subscribed) == enrolled and set(platform.subscribed.values()) == {1}
    assert set(platform.unsubscribed) == enrolled and set(platform.unsubscribed.values()) == {1}
    assert set(states(rt, restore_run).values()) == {"sent"}
    assert 1 < platform.max_in_flight <= 4
    # what each enrolment kept is the order of that very number (restore gets it back)
    for row in rt.store.deliveries(enrol_run):
        if row.state == "sent":
            assert row.provider_id == f"o-{row.phone[-4:]}-subscribe"
