"""Helpers for the Twilio, webhook and ringback tests: a movable clock, a run driver, a campaign file."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from dispatcher.campaigns import load_campaign
from dispatcher.runs import start_run
from dispatcher.runtime import Runtime
from dispatcher.sender import process_batch
from dispatcher.store import OPEN_STATES


def daytime() -> datetime:
    """Yesterday 10:00 in Asia/Shanghai (in UTC): inside the 08:00-21:00 SMS window, and in the past."""
    shanghai = ZoneInfo("Asia/Shanghai")
    today = datetime.now(shanghai).date() - timedelta(days=1)
    return datetime(today.year, today.month, today.day, 10, 0, tzinfo=shanghai).astimezone(UTC)


class Clock:
    """A clock tests move by hand, so backoff waits take no real time."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or daytime()
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += timedelta(seconds=seconds)


def campaign_yaml(campaign_id: str, *, send_by: datetime | None = None, extra: str = "") -> str:
    lines = [
        f"id: {campaign_id}",
        "title: 冒充客服退款诈骗预警（测试）",
        "owner: 公安分局",
        "template: themes/refund.sms.j2",
        "variables:",
        '  hotline: "96110"',
        "audience:",
        "  districts: all",
    ]
    if send_by is not None:
        lines.append(f'send_by: "{send_by.isoformat()}"')
    return "\n".join(lines) + "\n" + extra


def start(rt: Runtime, path: Path) -> str:
    """Start a run of the campaign at ``path``, its current version first approved by two operators:
    these runs go through real gateways (Twilio, HTTP, Kannel), which send only approved versions."""
    from tests.conftest import approve_campaign

    approve_campaign(rt, path)
    loaded = load_campaign(path, rt.settings.templates_dir)
    return str(start_run(rt, loaded).run_id)


def drive(rt: Runtime, run_id: str, clock: Clock, *, rounds: int = 10, step: float = 120.0) -> dict[str, int]:
    """Process every batch of the run until nothing is pending, moving the clock past each backoff."""
    for _ in range(rounds):
        run = rt.store.get_run(run_id)
        for batch_no in range(run.batches):
            process_batch(rt, run_id, batch_no)
        counts = rt.store.counts(run_id)
        if not counts.get("pending"):
            return counts
        clock.advance(step)
    return rt.store.counts(run_id)


def open_count(counts: Mapping[str, int]) -> int:
    return sum(counts.get(s, 0) for s in OPEN_STATES)


class LocalServer:
    """A real HTTP server on 127.0.0.1 in a thread; ``handler(method, path, headers, body)`` answers."""

    def __init__(
        self, handler: Callable[[str, str, Mapping[str, str], bytes], tuple[int, dict[str, str], bytes]]
    ) -> None:
        outer = self
        self.calls: list[tuple[str, str, bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.calls.append((self.command, self.path, body))
                status, headers, payload = handler(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _serve  # http.server's naming

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def json_reply(status: int, data: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


class FakeTwilio:
    """A Twilio-shaped peer that keeps state (Prism keeps none): it stores messages and lists them back.

    ``fail_after_store`` numbers get a 500 *after* the message was stored (it went out);
    ``fail_before_store`` numbers get a 503 the first time and nothing is stored.
    """

    def __init__(self, fail_after_store: set[str], fail_before_store: set[str]) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_after_store = fail_after_store
        self.fail_before_store = set(fail_before_store)
        self.posts = 0

    def __call__(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "POST":
            self.posts += 1
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            to = form["To"]
            if to in self.fail_before_store:
                self.fail_before_store.discard(to)
                return json_reply(503, {"code": 20503, "message": "Service Unavailable", "status": 503})
            message = {
                "sid": f"SM{len(self.messages):032x}",
                "to": to,
                "from": form.get("From"),
                "body": form["Body"],
                "status": "queued",
                "direction": "outbound-api",
                "date_created": datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000"),
            }
            self.messages.append(message)
            if to in self.fail_after_store:
                return json_reply(500, {"code": 20500, "message": "Internal Server Error", "status": 500})
            return json_reply(201, message)
        query = parse_qs(path.split("?", 1)[1]) if "?" in path else {}
        to = query.get("To", [""])[0]
        items = [m for m in self.messages if m["to"] == to]
        return json_reply(
            200,
            {
                "messages": items,
                "end": 0,
                "start": 0,
                "page": 0,
                "page_size": 50,
                "next_page_uri": None,
                "uri": path,
            },
        )
