"""The generic HTTP adapter: its mapping table (harness), config errors, a batched run against a server."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import Case, Exchange, Failed, Sent, message, run_case
from twilio_support import Clock, LocalServer, drive, json_reply, start

from dispatcher.errors import AmbiguousSendError, PermanentSendError, RetryableSendError, UnavailableSendError
from dispatcher.providers.http.gateway import HttpConfigError, HttpGateway, load_config
from dispatcher.runs import resume_run

TOKEN = "carrier-token-5d1e77a0"
SIGN_KEY = "sign-key-88aa13"
ENV = {"DISPATCH_HTTP_SECRET_CARRIER_TOKEN": TOKEN, "DISPATCH_HTTP_SECRET_CARRIER_SIGN": SIGN_KEY}
A, B, C = "+8613912340001", "+8613912340002", "+8613912340003"

SINGLE = """\
url: https://sms.example.cn/v2/send
headers:
  Authorization: "Bearer ${DISPATCH_HTTP_SECRET_CARRIER_TOKEN}"
body:
  format: json
  template:
    mobile: "{to}"
    content: "{body}"
    sign: "${DISPATCH_HTTP_SECRET_CARRIER_SIGN}"
    out_id: "{key}"
response:
  message_id: data.msgid
  error_code: code
  success_codes: ["0"]
permanent_codes: ["1001"]
retryable_codes: ["2001"]
opt_out_codes: ["1003"]
"""

FORM = """\
url: https://sms.example.cn/form/send
headers:
  X-Api-Key: "${DISPATCH_HTTP_SECRET_CARRIER_TOKEN}"
body:
  format: form
  template:
    phone: "{to}"
    text: "{body}"
response:
  message_id: id
  error_code: err
  success_codes: ["OK"]
"""

BATCH = """\
url: https://sms.example.cn/v2/batch
headers:
  Authorization: "Bearer ${DISPATCH_HTTP_SECRET_CARRIER_TOKEN}"
body:
  format: json
  template:
    mobiles: "{to_list}"
    content: "{body}"
response:
  message_id: data.batch_id
  error_code: code
  success_codes: ["0"]
permanent_codes: ["1001"]
opt_out_codes: ["1003"]
batch:
  max_size: 2
  results: data.results
  result_to: mobile
  result_message_id: msgid
  result_error_code: code
"""


def config(tmp_path: Path, text: str, env: Mapping[str, str] = ENV) -> Any:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env)


def gateway_maker(cfg: Any) -> Any:
    def make(transport: httpx.MockTransport) -> HttpGateway:
        return HttpGateway(cfg, transport=transport)

    return make


SEND = "/v2/send"
SINGLE_TABLE = [
    Case(
        "accepted",
        [message(A)],
        [
            Exchange(
                "POST",
                SEND,
                200,
                {"code": 0, "data": {"msgid": "m-1"}},
                request_has={"mobile": A, "sign": SIGN_KEY, "out_id": f"run-1:{A}"},
                headers_have={"Authorization": f"Bearer {TOKEN}"},
            )
        ],
        [Sent("m-1")],
    ),
    Case(
        "permanent code",
        [message(A)],
        [Exchange("POST", SEND, 200, {"code": 1001, "msg": "bad number"})],
        [Failed(PermanentSendError, "http.1001")],
    ),
    Case(
        "retryable code",
        [message(A)],
        [Exchange("POST", SEND, 200, {"code": "2001"})],
        [Failed(RetryableSendError, "http.2001")],
    ),
    Case(
        "opted out",
        [message(A)],
        [Exchange("POST", SEND, 200, {"code": 1003})],
        [Failed(PermanentSendError, "http.1003", opt_out=True)],
    ),
    Case(
        "unknown code fails",
        [message(A)],
        [Exchange("POST", SEND, 200, {"code": 9999})],
        [Failed(PermanentSendError, "http.9999")],
    ),
    Case(
        "429",
        [message(A)],
        [Exchange("POST", SEND, 429, {"msg": "slow down"})],
        [Failed(RetryableSendError, "http.429")],
    ),
    Case(
        "500 is ambiguous",
        [message(A)],
        [Exchange("POST", SEND, 500, "oops")],
        [Failed(AmbiguousSendError, "http.500")],
    ),
    Case(
        "400 without code",
        [message(A)],
        [Exchange("POST", SEND, 400, "bad")],
        [Failed(PermanentSendError, "http.400")],
    ),
    Case(
        "no id",
        [message(A)],
        [Exchange("POST", SEND, 200, {"code": 0, "data": {}})],
        [Failed(PermanentSendError, "http.no_id")],
    ),
    Case(
        "refused",
        [message(A)],
        [Exchange("POST", SEND, raise_=httpx.ConnectError)],
        # nothing reached the provider: a failover list may hand the message to the next one
        [Failed(UnavailableSendError, "http.connect")],
    ),
    Case(
        "read timeout",
        [message(A)],
        [Exchange("POST", SEND, raise_=httpx.ReadTimeout)],
        [Failed(AmbiguousSendError, "http.timeout")],
    ),
    Case(
        "two messages, two calls",
        [message(A), message(B)],
        [
            Exchange("POST", SEND, 200, {"code": 0, "data": {"msgid": "m-a"}}, request_has={"mobile": A}),
            Exchange("POST", SEND, 200, {"code": 1001}, request_has={"mobile": B}),
        ],
        [Sent("m-a"), Failed(PermanentSendError, "http.1001")],
    ),
]


@pytest.mark.parametrize("case", SINGLE_TABLE, ids=lambda c: c.label)
def test_single_send_mapping_table(tmp_path: Path, case: Case) -> None:
    run_case(gateway_maker(config(tmp_path, SINGLE)), case, secrets=[TOKEN, SIGN_KEY])


def test_form_body_and_api_key_header(tmp_path: Path) -> None:
    case = Case(
        "form",
        [message(A)],
        [
            Exchange(
                "POST",
                "/form/send",
                200,
                {"err": "OK", "id": "f-1"},
                request_has={"phone": A},
                headers_have={"X-Api-Key": TOKEN},
            )
        ],
        [Sent("f-1")],
    )
    run_case(gateway_maker(config(tmp_path, FORM)), case, secrets=[TOKEN])


BATCH_PATH = "/v2/batch"
SAME = "【常州经开区反诈中心】同一条提醒。回T退订"
BATCH_TABLE = [
    Case(
        "one call for two numbers, per-number results",
        [message(A, SAME), message(B, SAME)],
        [
            Exchange(
                "POST",
                BATCH_PATH,
                200,
                {
                    "code": 0,
                    "data": {
                        "batch_id": "b-1",
                        "results": [{"mobile": A, "code": 0, "msgid": "m-a"}, {"mobile": B, "code": 1003}],
                    },
                },
                request_has={"mobiles": [A, B], "content": SAME},
            )
        ],
        [Sent("m-a"), Failed(PermanentSendError, "http.1003", opt_out=True)],
    ),
    Case(
        "max_size splits, different texts never share a call",
        [message(A, SAME), message(B, SAME), message(C, SAME), message("+8613912340004", "另一条")],
        [
            Exchange(
                "POST",
                BATCH_PATH,
                200,
                {
                    "code": 0,
                    "data": {
                        "batch_id": "b-1",
                        "results": [{"mobile": A, "msgid": "1"}, {"mobile": B, "msgid": "2"}],
                    },
                },
                request_has={"mobiles": [A, B]},
            ),
            Exchange(
                "POST",
                BATCH_PATH,
                200,
                {"code": 0, "data": {"batch_id": "b-2", "results": [{"mobile": C, "msgid": "3"}]}},
                request_has={"mobiles": [C]},
            ),
            Exchange(
                "POST",
                BATCH_PATH,
                200,
                {
                    "code": 0,
                    "data": {"batch_id": "b-3", "results": [{"mobile": "+8613912340004", "msgid": "4"}]},
                },
                request_has={"content": "另一条"},
            ),
        ],
        [Sent("1"), Sent("2"), Sent("3"), Sent("4")],
    ),
    Case(
        "whole call rate limited",
        [message(A, SAME), message(B, SAME)],
        [Exchange("POST", BATCH_PATH, 429, {})],
        [Failed(RetryableSendError, "http.429"), Failed(RetryableSendError, "http.429")],
    ),
    Case(
        "number missing from the reply is ambiguous",
        [message(A, SAME), message(B, SAME)],
        [
            Exchange(
                "POST",
                BATCH_PATH,
                200,
                {"code": 0, "data": {"batch_id": "b", "results": [{"mobile": A, "msgid": "1"}]}},
            )
        ],
        [Sent("1"), Failed(AmbiguousSendError, "http.no_result")],
    ),
]


@pytest.mark.parametrize("case", BATCH_TABLE, ids=lambda c: c.label)
def test_batch_mapping_table(tmp_path: Path, case: Case) -> None:
    run_case(gateway_maker(config(tmp_path, BATCH)), case, secrets=[TOKEN])


# --------------------------------------------------------------------------- the harness catches what it must


def test_harness_fails_on_an_unused_mock(tmp_path: Path) -> None:
    case = Case(
        "unused",
        [message(A)],
        [Exchange("POST", SEND, 200, {"code": 0, "data": {"msgid": "m"}}), Exchange("POST", SEND, 200, {})],
        [Sent("m")],
    )
    with pytest.raises(AssertionError, match="left unused"):
        run_case(gateway_maker(config(tmp_path, SINGLE)), case, secrets=[TOKEN])


def test_harness_fails_on_a_secret_left_in_a_trace(tmp_path: Path) -> None:
    cfg = config(tmp_path, SINGLE)
    leaky = cfg.model_copy(update={"secrets": []})  # a gateway that does not know what to redact
    case = Case("leak", [message(A)], [Exchange("POST", SEND, 200, {"code": 0, "data": {"msgid": "m"}})], [Sent("m")])
    with pytest.raises(AssertionError, match="secret left in the trace"):
        run_case(gateway_maker(leaky), case, secrets=[SIGN_KEY])


def test_harness_fails_on_a_real_network_call(tmp_path: Path) -> None:
    cfg = config(tmp_path, SINGLE.replace("https://sms.example.cn", "http://127.0.0.1:9"))

    def real(_transport: httpx.MockTransport) -> HttpGateway:
        return HttpGateway(cfg)  # ignores the mock: would go to the network

    case = Case("real", [message(A)], [], [Failed(RetryableSendError, "http.connect")])
    with pytest.raises(AssertionError, match="real network connection"):
        run_case(real, case, secrets=[TOKEN])


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            SINGLE.replace("url: https://sms.example.cn/v2/send", "url: sms.example.cn"),
            "gateway.yaml:1:1: url: expected an http",
        ),
        (SINGLE.replace("  format: json", "  format: xml"), "gateway.yaml:5:3: body.format: "),
        (SINGLE + "retries: 3\n", "gateway.yaml:18:1: retries: unknown field"),
        (
            SINGLE.replace('    mobile: "{to}"\n', ""),
            "gateway.yaml:6:3: body.template: the body template never names",
        ),
        (
            SINGLE.replace("${DISPATCH_HTTP_SECRET_CARRIER_SIGN}", "${DISPATCH_HTTP_SECRET_MISSING}"),
            "gateway.yaml:9:5: body.template.sign: environment variable DISPATCH_HTTP_SECRET_MISSING is not set",
        ),
        ("url: [unclosed\n", "gateway.yaml:1:6: invalid YAML/JSON"),  # where the bracket was opened
        (
            SINGLE.replace("  message_id: data.msgid\n", ""),
            "gateway.yaml:11:1: response.message_id: required field is missing",
        ),
    ],
)
def test_bad_config_is_reported_at_its_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(HttpConfigError) as caught:
        config(tmp_path, text)
    assert str(caught.value).endswith(expected) or expected in str(caught.value), str(caught.value)


def test_bad_config_exits_2_with_one_line_and_sends_nothing(project: Any) -> None:
    project.registry(size=5, seed=8)
    project.write("gateway.yaml", SINGLE.replace("  format: json", "  format: xml"))
    result = project.dispatch(
        "run",
        "campaigns/refund-scam-lucheng.yaml",
        env={"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": "gateway.yaml", **ENV},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("gateway.yaml:5:3: body.format:"), result.stderr
    assert "Traceback" not in result.stderr
    assert project.runtime().store.list_runs() == []


# ------------------------------------------------------------------ a run against a real local server


class BatchProvider:
    """A batch-capable provider on 127.0.0.1: one JSON call carries many numbers, answered per number."""

    def __init__(self) -> None:
        self.calls = 0
        self.recipients = 0

    def __call__(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return json_reply(401, {"code": 401})
        data = json.loads(body)
        self.calls += 1
        self.recipients += len(data["mobiles"])
        results = [{"mobile": m, "code": 0, "msgid": f"{self.calls}-{i}"} for i, m in enumerate(data["mobiles"])]
        return json_reply(200, {"code": 0, "data": {"batch_id": f"b{self.calls}", "results": results}})


def test_batched_campaign_against_a_local_provider_uses_few_calls(project: Any) -> None:
    provider = BatchProvider()
    server = LocalServer(provider)
    try:
        project.write(
            "gateway.yaml",
            BATCH.replace("https://sms.example.cn", server.url).replace("max_size: 2", "max_size: 100"),
        )
        project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
        project.env.update(
            {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml"), **ENV}
        )
        project.registry(size=300, seed=9)
        clock = Clock()
        rt = project.runtime(clock=clock)
        path = project.write(
            "campaigns/plain.yaml",
            textwrap.dedent("""\
            id: plain
            title: 统一提醒
            owner: 公安分局
            template: plain.sms.j2
            audience:
              districts: all
        """),
        )
        run_id = start(rt, path)
        counts = drive(rt, run_id, clock)
        pending = sum(1 for r in rt.store.deliveries(run_id) if r.provider_id)
        assert counts.get("sent") == pending == provider.recipients
        assert provider.calls <= -(-pending // 100) + rt.store.get_run(run_id).batches
        assert provider.calls < pending / 10
    finally:
        server.close()


def test_rows_orphaned_with_a_provider_that_cannot_be_asked_become_unknown_not_resent(project: Any) -> None:
    provider = BatchProvider()
    server = LocalServer(provider)
    try:
        project.write("gateway.yaml", BATCH.replace("https://sms.example.cn", server.url))
        project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
        gateway_config = str(project.root / "gateway.yaml")
        project.env.update({"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": gateway_config, **ENV})
        project.registry(size=5, seed=10)
        clock = Clock()
        rt = project.runtime(clock=clock)
        path = project.write(
            "campaigns/plain.yaml",
            "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
        )
        run_id = start(rt, path)
        held = rt.store.claim(run_id, 0, "worker-that-died")  # no heartbeat: its claim is orphaned
        assert held
        resume_run(rt, run_id)
        states = {r.id: r.state for r in rt.store.deliveries(run_id)}
        assert {states[r.id] for r in held} == {"unknown"}
        assert provider.calls == 0  # nothing was sent again blindly
    finally:
        server.close()


def test_signed_delivery_report_moves_the_rows_the_http_gateway_sent(project: Any) -> None:
    from starlette.testclient import TestClient

    from dispatcher.providers.http.webhooks import report_signature
    from dispatcher.web.app import create_app

    provider = BatchProvider()
    server = LocalServer(provider)
    try:
        project.write("gateway.yaml", BATCH.replace("https://sms.example.cn", server.url))
        project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
        project.env.update(
            {
                "DISPATCH_GATEWAY": "http",
                "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml"),
                "DISPATCH_HTTP_REPORT_SECRET": "report-secret-7f31",
                **ENV,
            }
        )
        project.registry(size=4, seed=12)
        clock = Clock()
        rt = project.runtime(clock=clock)
        path = project.write(
            "campaigns/plain.yaml",
            "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
        )
        run_id = start(rt, path)
        drive(rt, run_id, clock)
        row = next(r for r in rt.store.deliveries(run_id) if r.provider_id)
        body = json.dumps({"reports": [{"message_id": row.provider_id, "status": "delivered"}]}).encode()
        reply = TestClient(create_app(rt)).post(
            "/webhooks/http/report",
            content=body,
            headers={"X-Dispatch-Signature": report_signature("report-secret-7f31", body)},
        )
        assert reply.status_code == 200 and reply.json() == {"reports": 1, "changed": 1}
        assert rt.store.provider_events.state_of(row.provider_id) == ["delivered"]
    finally:
        server.close()


def test_resume_with_redis_returns_when_only_rows_the_provider_cannot_be_asked_about_are_open(
    redis_project: Any,
) -> None:
    """Orphans a no-lookup provider leaves `unknown` wait for an operator: `resume` says so and exits 1, not wait on."""
    project = redis_project
    provider = BatchProvider()
    server = LocalServer(provider)
    try:
        project.write("gateway.yaml", BATCH.replace("https://sms.example.cn", server.url))
        project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
        gateway_config = str(project.root / "gateway.yaml")
        project.env.update({"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": gateway_config, **ENV})
        project.env["DISPATCH_SEND_WINDOW"] = "ignore"
        project.registry(size=5, seed=10)
        rt = project.runtime()
        path = project.write(
            "campaigns/plain.yaml",
            "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
        )
        run_id = start(rt, path)
        held = rt.store.claim(run_id, 0, "worker-that-died")  # every row, held by a worker with no heartbeat
        assert held and not rt.store.counts(run_id).get("pending")
        resumed = project.dispatch("resume", run_id, "--json", timeout=60)
        assert resumed.returncode == 1, resumed.stderr
        assert f"{len(held)} rows unknown" in resumed.stderr and "dispatch settle" in resumed.stderr
        assert json.loads(resumed.stdout)["counts"].get("unknown") == len(held)
        assert provider.calls == 0
    finally:
        server.close()


LOOKUP = """\
url: https://sms.example.cn/v2/send
body:
  template: {mobile: "{to}", content: "{body}", out_id: "{key}"}
response: {message_id: data.msgid, error_code: code, success_codes: ["0"]}
lookup:
  url: https://sms.example.cn/v2/query?out_id={key}
  message_id: data.msgid
"""


def test_lookup_answers_taken_for_an_id_never_taken_for_404_and_fails_on_anything_else(tmp_path: Path) -> None:
    from dispatcher.providers.base import LookupRequest

    replies = {f"run-1:{A}": (200, {"code": 0, "data": {"msgid": "m-7"}}), f"run-1:{B}": (404, {"code": 404})}

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v2/query"
        status, body = replies.get(request.url.params["out_id"], (500, {"code": 500}))
        return httpx.Response(status, json=body)

    gateway = HttpGateway(config(tmp_path, LOOKUP), transport=httpx.MockTransport(answer))
    assert gateway.can_lookup and not HttpGateway(config(tmp_path, SINGLE)).can_lookup
    found = gateway.lookup([LookupRequest(f"run-1:{n}", n, "", None) for n in (A, B)])
    assert {k: r.provider_id for k, r in found.items()} == {f"run-1:{A}": "m-7"}
    with pytest.raises(RetryableSendError) as failed:  # a provider error is no "never taken": nothing resent
        gateway.lookup([LookupRequest(f"run-1:{C}", C, "", None)])
    assert failed.value.code == "http.lookup"


def test_lookup_url_that_never_names_the_message_is_reported_at_its_line(tmp_path: Path) -> None:
    with pytest.raises(HttpConfigError) as bad:
        config(tmp_path, LOOKUP.replace("?out_id={key}", ""))
    assert "lookup.url" in str(bad.value) and ":6:" in str(bad.value)


def test_rows_orphaned_with_a_provider_that_can_be_asked_are_settled_by_lookup_each_sent_once(
    project: Any, tmp_path: Path
) -> None:
    import threading

    from tests.fake_carrier import CARRIER_CONFIG, LOOKUP_SECTION, Carrier, serve

    carrier = Carrier(tmp_path / "carrier.jsonl", token=TOKEN, delay=0.0)
    server = serve("127.0.0.1", 0, carrier)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        project.write(
            "gateway.yaml", CARRIER_CONFIG.format(url=url, timeout=5, max_size=50) + LOOKUP_SECTION.format(url=url)
        )
        project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
        project.env.update(
            {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml"), **ENV}
        )
        project.registry(size=20, seed=10)
        clock = Clock()
        rt = project.runtime(clock=clock)
        path = project.write(
            "campaigns/plain.yaml",
            "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
        )
        run_id = start(rt, path)
        held = rt.store.claim(run_id, 0, "worker-that-died")  # no heartbeat: its claim is orphaned
        handed = held[: len(held) // 2]
        carrier.take(run_id, [r.phone for r in handed])  # it had handed these over before it died, unrecorded
        result = resume_run(rt, run_id)
        assert result["already_sent"] == len(handed) and result["requeued"] == len(held) - len(handed)
        drive(rt, run_id, clock)
        rows = {r.key: r for r in rt.store.deliveries(run_id)}
        assert {rows[r.key].state for r in held} == {"sent"}
        assert all(rows[r.key].provider_id == carrier.lookup(r.key) for r in held)
        lines = (tmp_path / "carrier.jsonl").read_text().splitlines()
        taken = [f"{json.loads(x)['run_id']}:{json.loads(x)['to']}" for x in lines]
        assert len(taken) == len(set(taken)) == len(held), "each person taken by the carrier exactly once"
    finally:
        server.shutdown()
        server.server_close()


def test_a_watchdog_that_loses_the_lead_during_slow_lookups_moves_nothing(project: Any, tmp_path: Path) -> None:
    """One lookup per key can outlast the scheduler's lease: the pass renews it between lookups and,
    once another scheduler leads, settles and requeues nothing (the new leader does)."""
    import threading

    from dispatcher.runs import LOOKUP_CHUNK
    from dispatcher.watchdog import Watchdog
    from tests.fake_carrier import CARRIER_CONFIG, LOOKUP_SECTION, Carrier, serve

    carrier = Carrier(tmp_path / "carrier.jsonl", token=TOKEN, delay=0.0)
    server = serve("127.0.0.1", 0, carrier)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        gateway_yaml = CARRIER_CONFIG.format(url=url, timeout=5, max_size=50) + LOOKUP_SECTION.format(url=url)
        project.write("gateway.yaml", gateway_yaml)
        project.write("templates/plain.sms.j2", "请警惕冒充客服退款诈骗，核实请拨96110。")
        project.env.update({"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml")})
        project.env.update({**ENV, "DISPATCH_BATCH_SIZE": "100"})
        project.registry(size=60, seed=12)
        rt = project.runtime(clock=Clock())
        path = project.write(
            "campaigns/plain.yaml",
            "id: plain\ntitle: 统一提醒\nowner: 公安分局\ntemplate: plain.sms.j2\naudience:\n  districts: all\n",
        )
        run_id = start(rt, path)
        held = rt.store.claim(run_id, 0, "worker-that-died")
        assert len(held) > 2 * LOOKUP_CHUNK
        carrier.take(run_id, [r.phone for r in held[:5]])
        asked: list[bool] = []

        def lead_lost_after_two() -> bool:
            asked.append(len(asked) < 2)
            return asked[-1]

        result = Watchdog(rt).check_run(run_id, leading=lead_lost_after_two)
        assert result["found"] == result["requeued"] == 0
        assert rt.store.counts(run_id).get("sending") == len(held), "a deposed leader moved rows"
        assert asked[:3] == [True, True, False]  # renewed before two lookups, then the lead was gone

        renewals: list[int] = []
        result = Watchdog(rt).check_run(run_id, leading=lambda: renewals.append(1) is None)
        assert (result["found"], result["requeued"]) == (5, len(held) - 5)
        assert len(renewals) >= -(-len(held) // LOOKUP_CHUNK), "the lease is renewed between lookups"
    finally:
        server.shutdown()
        server.server_close()
