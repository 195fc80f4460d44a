"""Hostile or broken input never crashes a command: one line naming file, line and field, exit 2, nothing written.

Every test runs the real ``dispatch`` command in a subprocess whose address space is
capped at 2 GB and whose run time is bounded, so a regression (an alias bomb that
expands, a template that builds gigabytes) fails in seconds instead of eating the
machine. At send time a provider reply we cannot read is a classified per-row
outcome (``unknown``, looked up before any resend), never a crashed batch.
"""

from __future__ import annotations

import json
import re
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from twilio_support import LocalServer, json_reply

from tests.conftest import Project
from tests.test_campaign_validation import GOOD as CAMPAIGN

MEMORY_CAP = 2 * 1024**3
TIME_CAP = 90.0


HEADER = "phone,name,district,grid,segments,language,opted_out\n"
#: `path:line[:column]: field: message`
LINE_RE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+)(:(?P<col>\d+))?: (?P<field>[^:]+): (?P<message>.+)$")


def _bounded() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def dispatch(project: Project, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dispatch ARGS` as an operator runs it, within 2 GB and TIME_CAP seconds."""
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        cwd=project.root,
        env={**project.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIME_CAP,
        preexec_fn=_bounded,
    )


def refused(result: subprocess.CompletedProcess[str], path_end: str, field: str) -> re.Match[str]:
    """Exit 2, no traceback, and exactly one line on stderr: `path:line: field: message`."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert len(lines[0]) < 400, lines[0][:400]
    match = LINE_RE.match(lines[0])
    assert match, lines[0]
    assert match["path"].endswith(path_end), lines[0]
    assert match["field"] == field, lines[0]
    return match


def nothing_written(project: Project) -> None:
    runs = project.dispatch("runs", "--json")
    assert runs.returncode == 0, runs.stderr
    assert json.loads(runs.stdout) == {"runs": []}
    assert not project.outbox.exists()


def refused_by_validate_and_run(project: Project, path: Path, path_end: str, field: str) -> list[re.Match[str]]:
    matches = [refused(dispatch(project, command, str(path)), path_end, field) for command in ("validate", "run")]
    nothing_written(project)
    return matches


# ------------------------------------------------------------------ YAML: alias bombs and deep nesting

#: nine levels of nine aliases: 9**9 strings once expanded (the "billion laughs")
ALIAS_BOMB = "\n".join(
    ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)


def test_alias_bomb_in_a_campaign_is_refused_at_its_line(project: Project) -> None:
    path = project.write("campaigns/drill.yaml", CAMPAIGN.replace('  hotline: "96110"\n', ALIAS_BOMB + "\n"))
    for match in refused_by_validate_and_run(project, path, "drill.yaml", "variables.a0"):
        assert match["line"] == "6"
        assert "anchors (&a0) are not allowed" in match["message"]


HTTP_CONFIG = """\
url: http://127.0.0.1:9/send
body:
  format: json
  template:
    mobile: "{to}"
    content: "{body}"
response:
  message_id: data.msgid
"""


def test_alias_bomb_in_the_http_gateway_config_is_refused(project: Project) -> None:
    config = project.write("var/carrier.yaml", HTTP_CONFIG + "extra:\n" + ALIAS_BOMB + "\n")
    env = {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(config)}
    project.registry(size=20)
    match = refused(dispatch(project, "run", "campaigns/refund-scam-lucheng.yaml", env=env), "carrier.yaml", "extra.a0")
    assert match["line"] == "10" and "anchors" in match["message"]
    nothing_written(project)


RINGBACK_CAMPAIGN = """\
id: ringback-drill
title: 反诈彩铃演练
owner: 公安分局
channel: ringback
template: themes/brushing.sms.j2
variables:
  hotline: "96110"
audience:
  districts: [横林镇]
window:
  start: "2030-01-01T08:00:00+08:00"
  end: "2030-01-31T21:00:00+08:00"
"""


def test_alias_bomb_in_the_ringback_carrier_config_is_refused(project: Project) -> None:
    config = project.write("var/ringback.yaml", "enrol:\n" + ALIAS_BOMB + "\nrestore:\n  url: x\n")
    path = project.write("campaigns/ringback-drill.yaml", RINGBACK_CAMPAIGN)
    env = {"DISPATCH_RINGBACK_GATEWAY": "carrier-http", "DISPATCH_RINGBACK_CONFIG": str(config)}
    project.registry(size=20)
    match = refused(dispatch(project, "run", str(path), env=env), "ringback.yaml", "enrol.a0")
    assert match["line"] == "2"
    nothing_written(project)


DEEP = 5000


@pytest.mark.parametrize(
    ("nested", "field"),
    [
        pytest.param("  deep: " + "[" * DEEP + "]" * DEEP + "\n", "notes.deep.0.0.0.0.…", id="flow"),
        pytest.param("  deep:\n  " + "- " * DEEP + "x\n", "notes.deep.0.0.0.0.…", id="block"),
        pytest.param("  deep: " + '{"a": ' * DEEP + "1" + "}" * DEEP + "\n", "notes.deep.a.a.a.a.…", id="json"),
    ],
)
def test_nesting_5000_levels_deep_in_a_campaign_is_refused(project: Project, nested: str, field: str) -> None:
    path = project.write("campaigns/drill.yaml", CAMPAIGN + "notes:\n" + nested)
    for match in refused_by_validate_and_run(project, path, "drill.yaml", field):
        assert match["line"] in ("10", "11"), match.group(0)
        assert "nested deeper than" in match["message"]


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{{ " + "(" * DEEP + "hotline" + ")" * DEEP + " }}", id="brackets"),
        pytest.param("{% if true %}" * DEEP + "{{ hotline }}" + "{% endif %}" * DEEP, id="blocks"),
    ],
)
def test_template_nested_5000_levels_deep_is_refused(project: Project, template: str) -> None:
    project.write("templates/deep.sms.j2", template)
    path = project.write("campaigns/drill.yaml", CAMPAIGN.replace("themes/brushing.sms.j2", "deep.sms.j2"))
    for match in refused_by_validate_and_run(project, path, "drill.yaml", "template"):
        assert match["line"] == "4" and "nested too deeply" in match["message"], match.group(0)


def test_json_http_config_nested_5000_levels_deep_is_refused(project: Project) -> None:
    deep = '{"a": ' * DEEP + "1" + "}" * DEEP
    config = project.write(
        "var/carrier.json",
        json.dumps({"url": "http://127.0.0.1:9/send", "body": {"template": {"to": "{to}"}}})[:-1]
        + f', "response": {deep}}}',
    )
    env = {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(config)}
    project.registry(size=20)
    match = refused(
        dispatch(project, "run", "campaigns/refund-scam-lucheng.yaml", env=env), "carrier.json", "response.a.a.a.a.a.…"
    )
    assert match["line"] == "1" and "nested deeper than" in match["message"]
    nothing_written(project)


# ------------------------------------------------------------------ strings no message or database can carry


@pytest.mark.parametrize(
    ("edit", "field", "line", "words"),
    [
        pytest.param(
            lambda s: s.replace("title: 演练", 'title: "演练\\ud800"'),
            "title",
            "2",
            "lone surrogate U+D800",
            id="surrogate",
        ),
        pytest.param(
            lambda s: s.replace("title: 演练", 'title: "演练\\0"'), "title", "2", "control character U+0000", id="nul"
        ),
        pytest.param(
            lambda s: s.replace('hotline: "96110"', 'hotline: "96110\\x1b[2J"'),
            "variables.hotline",
            "6",
            "control character U+001B",
            id="escape-in-variable",
        ),
    ],
)
def test_unusable_character_in_a_campaign_string_is_a_field_error(
    project: Project, edit: Any, field: str, line: str, words: str
) -> None:
    path = project.write("campaigns/drill.yaml", edit(CAMPAIGN))
    for match in refused_by_validate_and_run(project, path, "drill.yaml", field):
        assert match["line"] == line and words in match["message"], match.group(0)


def test_control_character_in_the_http_gateway_config_is_refused(project: Project) -> None:
    config = project.write("var/carrier.yaml", HTTP_CONFIG + 'headers:\n  X-Api-Key: "k\\r\\nX-Evil: 1"\n')
    env = {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(config)}
    project.registry(size=20)
    match = refused(
        dispatch(project, "run", "campaigns/refund-scam-lucheng.yaml", env=env), "carrier.yaml", "headers.X-Api-Key"
    )
    assert match["line"] == "10" and "control character U+000D" in match["message"], match.group(0)
    nothing_written(project)


def test_raw_nul_byte_in_a_campaign_file_is_refused_at_its_line(project: Project) -> None:
    path = project.write("campaigns/drill.yaml", CAMPAIGN.replace("title: 演练", "title: 演\x00练"))
    result = dispatch(project, "validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"^\S*drill\.yaml:2:9: invalid YAML: character U\+0000", lines[0]), lines
    nothing_written(project)


def test_template_path_longer_than_the_file_system_allows_is_a_template_error(project: Project) -> None:
    long_name = "themes/" + "a" * 300 + ".sms.j2"
    path = project.write("campaigns/drill.yaml", CAMPAIGN.replace("themes/brushing.sms.j2", long_name))
    for match in refused_by_validate_and_run(project, path, "drill.yaml", "template"):
        assert match["line"] == "4" and "File name too long" in match["message"], match.group(0)


# ------------------------------------------------------------------ the resident registry


def import_csv(project: Project, data: bytes) -> tuple[subprocess.CompletedProcess[str], int]:
    csv_path = project.root / "var" / "residents.csv"
    csv_path.write_bytes(data)
    result = dispatch(project, "audience", "import", str(csv_path))
    stats = project.dispatch("audience", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    residents = sum(d.get("residents", 0) for d in json.loads(stats.stdout)["by_district"].values())
    return result, residents


def good_row(n: int, name: str = "张伟") -> str:
    return f"1380000{n:04d},{name},横林镇,HL-01,workers,zh-CN,false\n"


def row_errors(result: subprocess.CompletedProcess[str]) -> list[re.Match[str]]:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    matches = [LINE_RE.match(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m]


def test_csv_field_over_the_csv_limit_is_a_row_error_and_the_good_rows_are_imported(project: Project) -> None:
    data = HEADER + good_row(1) + good_row(2, "x" * 140_000) + good_row(3) + good_row(4)
    result, residents = import_csv(project, data.encode())
    [error] = row_errors(result)
    assert error["path"].endswith("residents.csv") and error["line"] == "3" and error["field"] == "name"
    assert "longer than 131072 characters" in error["message"]
    assert residents == 3
    assert "imported 3 residents" in result.stdout


def test_nul_or_control_character_in_a_registry_name_rejects_the_row(project: Project) -> None:
    data = HEADER + good_row(1) + good_row(2, "张\x00伟") + good_row(3, "李\x1b[31m") + good_row(4)
    result, residents = import_csv(project, data.encode())
    errors = row_errors(result)
    assert [(e["line"], e["field"]) for e in errors] == [("3", "name"), ("4", "name")]
    assert "U+0000" in errors[0]["message"] and "U+001B" in errors[1]["message"]
    assert residents == 2


def test_surrogate_or_undecodable_bytes_in_the_registry_reject_only_their_row(project: Project) -> None:
    data = (
        (HEADER + good_row(1)).encode()
        + good_row(2, "@@").encode().replace(b"@@", b"\xed\xa0\x80")
        + (good_row(3)).encode()
    )
    result, residents = import_csv(project, data)
    [error] = row_errors(result)
    assert (error["line"], error["field"]) == ("3", "name")
    assert "not UTF-8" in error["message"]
    assert residents == 2


# ------------------------------------------------------------------ templates that would build gigabytes


@pytest.mark.parametrize(
    "template",
    [
        pytest.param('{{ "a" * 300000000 }}{{ hotline }}', id="repeat-300MB"),
        pytest.param('{{ "a" * 3000000000 }}{{ hotline }}', id="repeat-3GB"),
        pytest.param(
            "{% for i in range(100000) %}{% for j in range(100000) %}防诈骗{% endfor %}{% endfor %}{{ hotline }}",
            id="nested-loops",
        ),
        pytest.param(
            '{% set ns = namespace(s="a") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}'
            "{{ ns.s }}{{ hotline }}",
            id="doubling",
        ),
        pytest.param('{{ "x"|center(3000000000) }}{{ hotline }}', id="padding"),
    ],
)
def test_template_output_is_bounded(project: Project, template: str) -> None:
    project.write("templates/bomb.sms.j2", "您好\n" + template + "\n")
    path = project.write("campaigns/drill.yaml", CAMPAIGN.replace("themes/brushing.sms.j2", "bomb.sms.j2"))
    for command in ("validate", "preview", "run"):
        match = refused(dispatch(project, command, str(path)), "bomb.sms.j2", "template")
        assert match["line"] == "2" and "too long" in match["message"], match.group(0)
    nothing_written(project)


# ------------------------------------------------------------------ providers answering what we cannot read

TWILIO_ENV = {
    "DISPATCH_GATEWAY": "twilio",
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "TWILIO_AUTH_TOKEN": "auth-token-9f2c41d7",
    "TWILIO_FROM": "+15005550006",
    "DISPATCH_PUBLIC_URL": "https://dispatch.example.org",
}


def deliveries(project: Project) -> list[dict[str, Any]]:
    database = project.env["DISPATCH_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(database) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT state, provider_id, error_code, attempts FROM deliveries")]


def run_against(
    project: Project, reply: tuple[int, dict[str, str], bytes], env: dict[str, str]
) -> tuple[list[dict[str, Any]], int]:
    """`dispatch run` of a 横林镇 campaign against a local provider that answers every send with ``reply``."""

    def provider(method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        return reply if method in ("POST", "PUT") else json_reply(200, {"messages": [], "next_page_uri": None})

    server = LocalServer(provider)
    try:
        project.registry(size=60)
        path = project.write("campaigns/drill.yaml", CAMPAIGN)
        project.approve("campaigns/drill.yaml")  # Twilio and HTTP carriers send approved versions only
        # an HTTP config may name only DISPATCH_HTTP_SECRET_* variables: the provider's URL comes in as one
        urls = {"DISPATCH_TWILIO_BASE_URL": server.url, "DISPATCH_HTTP_SECRET_PROVIDER_URL": server.url}
        result = dispatch(project, "run", str(path), "--json", env={**env, **urls})
        sends = [c for c in server.calls if c[0] == "POST"]
    finally:
        server.close()
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: rows are left for an operator to look up
    rows = deliveries(project)
    assert len(rows) > 1 and 0 < len(sends) <= len(rows), (len(rows), len(sends))  # nothing resent blindly
    assert all(r["attempts"] == 1 for r in rows), rows[:3]
    return rows, len(sends)


def assert_unknown(rows: list[dict[str, Any]], code: str) -> None:
    assert {r["state"] for r in rows} == {"unknown"}, rows[:3]
    assert {r["error_code"] for r in rows} == {code}
    assert all(r["provider_id"] in (None, "") for r in rows), "no provider id 'None' may be stored"


def test_twilio_201_without_a_sid_leaves_the_row_unknown_not_sent_as_none(project: Project) -> None:
    rows, _ = run_against(project, json_reply(201, {"status": "queued", "to": "+8613800000000"}), TWILIO_ENV)
    assert_unknown(rows, "twilio.bad_provider_response")


def test_twilio_success_with_a_body_that_is_not_json_leaves_the_row_unknown(project: Project) -> None:
    rows, _ = run_against(project, (201, {"Content-Type": "text/html"}, b"<html>accepted</html>"), TWILIO_ENV)
    assert_unknown(rows, "twilio.bad_provider_response")


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_http_provider_success_with_a_body_that_is_not_json_leaves_the_row_unknown(
    project: Project, batch: bool
) -> None:
    config = HTTP_CONFIG.replace("http://127.0.0.1:9/send", "${DISPATCH_HTTP_SECRET_PROVIDER_URL}/send")
    if batch:
        config = config.replace('mobile: "{to}"', 'mobiles: "{to_list}"') + "batch:\n  max_size: 50\n"
        # one text for everyone (no name in it), so that one call carries every number
        project.write("templates/themes/brushing.sms.j2", "警惕刷单诈骗，请拨打{{ hotline }}。")
    path = project.write("var/carrier.yaml", config)
    env = {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(path)}
    rows, sends = run_against(project, (200, {"Content-Type": "text/plain"}, b"OK"), env)
    assert_unknown(rows, "http.bad_provider_response")
    assert (sends < len(rows)) == batch  # a batch call carries many numbers
