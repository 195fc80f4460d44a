"""HTTP adapter benchmark: a 10,000-person campaign through a batch-capable provider on 127.0.0.1.

The provider is a real HTTP server in this process (one JSON call carries many
numbers and answers per number). The campaign is sent by the real ``dispatch run``
command (embedded broker, SQLite delivery log) with ``DISPATCH_GATEWAY=http``.
Prints: recipients, provider calls, recipients per call, wall time of the run and
recipients per second, and checks that every row holds the provider's message id.

Usage: python bench/bench_http_gateway.py [--size 10000] [--max-size 500] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0f9e"


class Provider:
    def __init__(self) -> None:
        self.calls = 0
        self.recipients = 0
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    payload = b'{"code": 401}'
                else:
                    data = json.loads(body)
                    with provider.lock:
                        provider.calls += 1
                        provider.recipients += len(data["mobiles"])
                        call = provider.calls
                    results = [{"mobile": m, "code": 0, "msgid": f"{call}-{i}"} for i, m in enumerate(data["mobiles"])]
                    payload = json.dumps({"code": 0, "data": {"batch_id": f"b{call}", "results": results}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


GATEWAY = """\
url: {url}/v2/batch
headers:
  Authorization: "Bearer ${{DISPATCH_HTTP_SECRET_BENCH_TOKEN}}"
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
  max_size: {max_size}
  results: data.results
  result_to: mobile
  result_message_id: msgid
  result_error_code: code
"""

CAMPAIGN = """\
id: bench-http
title: 统一反诈提醒（基准）
owner: 公安分局
template: plain.sms.j2
audience:
  districts: all
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--max-size", type=int, default=500, help="numbers per provider call")
    parser.add_argument("--batch-size", type=int, default=500, help="DISPATCH_BATCH_SIZE (rows per Dramatiq message)")
    args = parser.parse_args()

    provider = Provider()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        root = Path(tmp)
        (root / "campaigns").mkdir()
        (root / "templates").mkdir()
        (root / "var").mkdir()
        (root / "templates" / "plain.sms.j2").write_text("请警惕冒充客服退款诈骗，核实请拨96110。", encoding="utf-8")
        (root / "campaigns" / "bench.yaml").write_text(CAMPAIGN, encoding="utf-8")
        (root / "gateway.yaml").write_text(GATEWAY.format(url=provider.url, max_size=args.max_size), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "TWILIO_"))}
        env.update(
            PYTHONPATH=str(ROOT),
            DISPATCH_DATABASE_URL=f"sqlite:///{root / 'var' / 'dispatch.db'}",
            DISPATCH_GATEWAY="http",
            DISPATCH_HTTP_CONFIG=str(root / "gateway.yaml"),
            DISPATCH_HTTP_SECRET_BENCH_TOKEN=TOKEN,
            DISPATCH_BATCH_SIZE=str(args.batch_size),
            DISPATCH_SEND_WINDOW="ignore",  # the benchmark is about throughput, not the 08:00-21:00 rule
            DISPATCH_LOG_LEVEL="WARNING",
            DISPATCH_LOG_FORMAT="json",
        )

        def dispatch(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "dispatcher", *argv], cwd=root, env=env, capture_output=True, text=True,
                input=stdin,
            )  # fmt: skip

        csv_path = root / "var" / "residents.csv"
        password = secrets.token_urlsafe(18) + "\n"
        # an HTTP carrier is a real gateway: it sends only a version two operators approved
        for argv, stdin in (
            (("audience", "generate", "--size", str(args.size), "--seed", "11", "--output", str(csv_path)), None),
            (("audience", "import", str(csv_path)), None),
            (("users", "add", "bench-author", "--role", "operator"), password),
            (("users", "add", "bench-approver", "--role", "operator"), password),
            (("submit", "campaigns/bench.yaml", "--as", "bench-author"), password),
            (("approve", "campaigns/bench.yaml", "--as", "bench-approver"), password),
        ):
            done = dispatch(*argv, stdin=stdin)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
        started = time.perf_counter()
        run = dispatch("run", "campaigns/bench.yaml", "--json")
        elapsed = time.perf_counter() - started
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        status = json.loads(run.stdout.strip().splitlines()[-1])
        sent = status["counts"].get("sent", 0)
        print(f"recipients in registry     {args.size}")
        print(f"sent (rows with msg id)    {sent}   counts={status['counts']}")
        print(
            f"provider calls             {provider.calls}   (max {args.max_size} numbers per call, "
            f"{args.batch_size} rows per Dramatiq batch)"
        )
        print(f"recipients per call        {provider.recipients / max(1, provider.calls):.1f}")
        print(f"dispatch run wall time     {elapsed:.2f} s (process start to exit, incl. fan-out and recording)")
        print(f"recipients per second      {sent / elapsed:.0f}")
        provider.server.shutdown()
        return 0 if sent == provider.recipients else 1


if __name__ == "__main__":
    sys.exit(main())
