"""Provider failover: an ordered gateway list survives the primary's outage without sending anyone twice.

The primary is a real process stopped mid-run: Prism serving Twilio's API description
(killed, so connections are refused), or a local carrier server for the HTTP adapter.
The secondary is the outbox. A message moves on only when the primary proved it took
nothing; one whose fate is ambiguous (the server read the request, then dropped the
connection or never answered) stays with the primary as ``unknown``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM, SPEC, _prism_command, free_port
from twilio_support import campaign_yaml

from dispatcher import metrics
from dispatcher.campaigns import load_campaign
from dispatcher.errors import CampaignError, ConfigError
from dispatcher.settings import Settings
from tests.conftest import approve_campaign, wait_for

pytestmark = pytest.mark.slow

CARRIER = """\
url: {url}/send
body:
  format: json
  template:
    mobile: "{{to}}"
    content: "{{body}}"
    out_id: "{{key}}"
response:
  message_id: data.msgid
  error_code: code
  success_codes: ["0"]
"""


# ------------------------------------------------------------------ real peers


def start_prism(log_path: Path, port: int) -> subprocess.Popen[bytes]:
    from tests.conftest import missing_service

    command = _prism_command()
    if command is None or not SPEC.exists():
        missing_service("Prism or Twilio's OpenAPI description is not installed (run `make test`)")
    assert command is not None
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "mock", "-h", "127.0.0.1", "-p", str(port), str(SPEC)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while "Prism is listening" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            missing_service(f"Prism did not start: {log_path.read_text(errors='replace')[-400:]}")
        time.sleep(0.2)
    return process


class Carrier(BaseHTTPRequestHandler):
    """A carrier's send API: answers ``{"code": "0"}``, or (``mode``) reads the request and then drops
    the connection or never answers in time: the message may have been taken."""

    mode = "ok"
    received: list[str]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self.server.received.append(body["out_id"])  # type: ignore[attr-defined]
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "drop" or (mode == "mixed" and len(self.server.received) % 2):  # type: ignore[attr-defined]
            self.connection.shutdown(socket.SHUT_RDWR)  # read and taken, then the line goes dead
            self.close_connection = True
            return
        if mode in ("hang", "mixed"):
            time.sleep(3)  # longer than DISPATCH_GATEWAY_TIMEOUT: the reply never arrives in time
        reply = json.dumps({"code": "0", "data": {"msgid": f"c-{body['out_id']}"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up waiting: what it makes of that is the point
            self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        return None


def serve_carrier(port: int, mode: str = "ok") -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), Carrier)
    server.daemon_threads = True
    server.mode = mode  # type: ignore[attr-defined]
    server.received = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def carriers() -> Iterator[list[ThreadingHTTPServer]]:
    started: list[ThreadingHTTPServer] = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ reading the result


def rows(project: Any, run_id: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    sa.text("SELECT key, state, gateway, batch_no FROM deliveries WHERE run_id = :r"), {"r": run_id}
                ).mappings()
            ]
    finally:
        engine.dispose()


def sent_count(project: Any) -> int:
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM deliveries WHERE state = 'sent'")).scalar_one())
    except sa.exc.OperationalError:
        return 0  # the run has not created its tables yet
    finally:
        engine.dispose()


def outbox_lines(project: Any) -> list[dict[str, Any]]:
    if not project.outbox.exists():
        return []
    return [json.loads(line) for line in project.outbox.read_text(encoding="utf-8").splitlines() if line]


def prism_accepted(log: str) -> int:
    """Messages Prism answered with 201 (a created message): the primary's own record of what it took.

    Only a message POST is answered 201 (a lookup is a GET, answered 200)."""
    return log.count('> Responding with "201"')


def run_in_background(project: Any, path: str, **env: str) -> subprocess.Popen[str]:
    return project.popen("run", path, "--json", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """The run's summary; exit 1 only when rows are left open (``unknown``, for ``resume`` to look up)."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode in (0, 1), stderr[-2000:]
    summary = dict(json.loads(stdout))
    assert (process.returncode == 1) == bool(summary["open"]), stderr[-2000:]
    return summary


# ------------------------------------------------------------------ the tests


def test_killing_prism_mid_run_fails_over_to_the_outbox_and_sends_everyone_exactly_once(
    project: Any, tmp_path: Path
) -> None:
    port = free_port()
    prism_log = tmp_path / "prism.log"
    prism = start_prism(prism_log, port)
    try:
        project.registry(size=300, seed=21)
        project.write("campaigns/failover.yaml", campaign_yaml("failover-drill"))
        project.approve("campaigns/failover.yaml")  # Twilio first: a real gateway sends approved versions only
        env = {
            "DISPATCH_GATEWAY": "twilio,outbox",
            "DISPATCH_TWILIO_BASE_URL": f"http://127.0.0.1:{port}",
            "DISPATCH_PUBLIC_URL": "http://127.0.0.1:9",
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM": FROM,
            # paced, so the primary is killed with most of the run still to go
            "DISPATCH_RATE_LIMIT": "40",
            "DISPATCH_BATCH_SIZE": "10",
            "DISPATCH_FAILOVER_COOLDOWN": "600",
        }
        run = run_in_background(project, "campaigns/failover.yaml", **env)
        wait_for(lambda: sent_count(project) >= 60, timeout=60, what="60 messages through Prism")
        os.killpg(prism.pid, signal.SIGKILL)  # the whole Prism process tree: connections are refused from now
        killed_at = time.time()
        prism.wait(timeout=10)
        summary = finished(run)
        run_id = summary["run_id"]
    finally:
        if prism.poll() is None:
            os.killpg(prism.pid, signal.SIGKILL)
            prism.wait(timeout=10)

    delivered = rows(project, run_id)
    lines = outbox_lines(project)
    outbox_keys = Counter(line["key"] for line in lines)
    by_gateway = Counter(r["gateway"] for r in delivered if r["state"] == "sent")
    twilio_keys = {r["key"] for r in delivered if r["gateway"] == "twilio" and r["state"] in ("sent", "unknown")}
    # exactly once: no key twice in the outbox, none in both providers, Prism took what the log says it took
    doubles = sum(n - 1 for n in outbox_keys.values()) + len(twilio_keys & set(outbox_keys))
    lost = [r["key"] for r in delivered if r["state"] not in ("sent", "unknown", "skipped")]
    assert doubles == 0
    assert lost == []
    assert len(delivered) == summary["total"] > 250
    assert by_gateway["twilio"] >= 60 and by_gateway["outbox"] > 0
    assert {r["key"] for r in delivered if r["gateway"] == "outbox"} == set(outbox_keys)
    # a row cut off mid-request by the kill is ambiguous: it stays with Twilio as unknown, never resent
    unknown = [r for r in delivered if r["state"] == "unknown"]
    assert all(r["gateway"] == "twilio" and r["key"] not in outbox_keys for r in unknown)
    # Prism's own record: every message it created is a Twilio row; one it created as it died, whose reply
    # never arrived, is among the unknown ones (taken by Twilio, so rightly never handed to the outbox)
    accepted = prism_accepted(prism_log.read_text(errors="replace"))
    assert by_gateway["twilio"] <= accepted <= by_gateway["twilio"] + len(unknown)

    first_secondary = min(datetime.fromisoformat(line["at"]).timestamp() for line in lines)
    switch = first_secondary - killed_at
    print(
        f"\nfailover twilio(prism)->outbox: switch {switch * 1000:.0f} ms after the kill; "
        f"twilio {by_gateway['twilio']}, outbox {by_gateway['outbox']}, unknown {len(unknown)}, "
        f"doubles {doubles}, lost {len(lost)}"
    )
    assert 0 <= switch < 5

    status = project.dispatch("status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    gateways = json.loads(status.stdout)["gateways"]
    assert gateways["messages"]["outbox"] == by_gateway["outbox"]
    assert gateways["refused"]["twilio"]["twilio.connect"] >= 1
    assert gateways["failed_over"] == by_gateway["outbox"]
    text = project.dispatch("status", run_id)
    assert "messages per gateway:" in text.stdout and "failover: twilio passed over" in text.stdout

    verify = project.dispatch("audit", "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_ambiguous_failures_of_the_primary_never_fail_over(project: Any, carriers: list[Any]) -> None:
    port = free_port()
    carrier = serve_carrier(port, mode="mixed")  # every other request dropped after reading, the rest too slow
    carriers.append(carrier)
    project.write("carrier.yaml", CARRIER.format(url=f"http://127.0.0.1:{port}"))
    project.registry(size=12, seed=22)
    project.write("campaigns/ambiguous.yaml", campaign_yaml("ambiguous-drill", extra="gateways: [http, outbox]\n"))
    project.approve("campaigns/ambiguous.yaml")
    result = project.dispatch(
        "run",
        "campaigns/ambiguous.yaml",
        "--json",
        env={"DISPATCH_HTTP_CONFIG": "carrier.yaml", "DISPATCH_GATEWAY_TIMEOUT": "1"},
    )
    assert result.returncode == 1, result.stderr  # rows left unknown: open until `resume` looks them up
    run_id = json.loads(result.stdout)["run_id"]
    delivered = [r for r in rows(project, run_id) if r["state"] != "skipped"]  # opted out: never sent
    assert {(r["state"], r["gateway"]) for r in delivered} == {("unknown", "http")}
    assert sorted(carrier.received) == sorted(r["key"] for r in delivered)  # each taken once, by the carrier
    assert outbox_lines(project) == []
    status = json.loads(project.dispatch("status", run_id, "--json").stdout)["gateways"]
    assert status["refused"] == {} and status["failed_over"] == 0


def test_breaker_probes_the_restarted_primary_after_the_cooldown_and_closes(project: Any, carriers: list[Any]) -> None:
    from dispatcher.runs import start_run
    from dispatcher.sender import process_batch

    port = free_port()
    project.write("carrier.yaml", CARRIER.format(url=f"http://127.0.0.1:{port}"))
    project.env.update(
        {
            "DISPATCH_GATEWAY": "http,outbox",
            "DISPATCH_HTTP_CONFIG": str(project.root / "carrier.yaml"),
            "DISPATCH_FAILOVER_COOLDOWN": "0.5",
            "DISPATCH_BATCH_SIZE": "5",
        }
    )
    project.registry(size=15, seed=23)
    path = project.write("campaigns/probe.yaml", campaign_yaml("probe-drill"))

    def failovers() -> float:
        sample = metrics.REGISTRY.get_sample_value(
            "dispatch_gateway_failovers_total", {"from_gateway": "http", "to_gateway": "outbox"}
        )
        return sample or 0.0

    counted_before = failovers()
    rt = project.runtime()
    approve_campaign(rt, path)
    run = start_run(rt, load_campaign(path, rt.settings.templates_dir, gateways=rt.known_gateways()))
    run_id = run.run_id
    # batch 0: nobody listens on the carrier's port, the first refusal opens its circuit
    process_batch(rt, run_id, 0)
    # batch 1: the carrier is back, but the circuit is still open: the outbox takes them without a call
    carrier = serve_carrier(port)
    carriers.append(carrier)
    process_batch(rt, run_id, 1)
    assert carrier.received == []
    # batch 2, after the cool-down: one probe reaches the carrier, which closes the circuit
    time.sleep(0.6)
    process_batch(rt, run_id, 2)
    delivered = [r for r in rows(project, run_id) if r["state"] == "sent"]
    by_batch = {(r["batch_no"], r["gateway"]) for r in delivered}
    assert by_batch == {(0, "outbox"), (1, "outbox"), (2, "http")}
    assert sorted(carrier.received) == sorted(r["key"] for r in delivered if r["batch_no"] == 2)
    assert rt.gateway.breakers["http"].state == "closed"  # type: ignore[attr-defined]
    assert failovers() - counted_before == sum(1 for r in delivered if r["gateway"] == "outbox")
    assert metrics.REGISTRY.get_sample_value("dispatch_gateway_circuit_open", {"gateway": "http"}) == 0
    keys = [line["key"] for line in outbox_lines(project)] + carrier.received
    assert sorted(keys) == sorted(r["key"] for r in delivered)  # everyone once, through one provider


def test_gateway_list_in_settings_and_campaign_is_checked(project: Any) -> None:
    assert Settings.from_env({"DISPATCH_GATEWAY": " twilio , outbox "}).gateways == ("twilio", "outbox")
    with pytest.raises(ConfigError, match="listed twice"):
        Settings.from_env({"DISPATCH_GATEWAY": "outbox,outbox"})
    project.write("campaigns/typo.yaml", campaign_yaml("typo", extra="gateways: [twilio, twillio]\n"))
    result = project.dispatch("validate", "campaigns/typo.yaml")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "campaigns/typo.yaml:" in line and "gateways" in line and "unknown gateway 'twillio'" in line
    assert "known: http, kannel, outbox, twilio" in line
    run = project.dispatch("run", "campaigns/typo.yaml")
    assert run.returncode == 2 and not project.outbox.exists()
    with pytest.raises(CampaignError):
        load_campaign(project.root / "campaigns/typo.yaml", project.root / "templates", gateways=["twilio"])
    unknown_env = project.dispatch("run", "campaigns/quarterly-themes.yaml", env={"DISPATCH_GATEWAY": "outbox,nope"})
    assert unknown_env.returncode == 2 and "unknown gateway 'nope'" in unknown_env.stderr
