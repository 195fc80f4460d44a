"""A small SMS carrier for tests, run as its own process (on a test host: ``ip netns exec HOST python ...``).

It speaks the batch dialect the generic HTTP adapter is configured for in CARRIER_CONFIG:
one POST carries many numbers and one text and is answered number by number. Every number
it takes is appended to ``--record`` (one JSON line: run id, number, message id) *before*
the reply is written, as a real provider commits a message before answering: a client that
loses the reply (a cut link, a timeout) leaves a message that went out but was never
confirmed, which only the lookup can reveal. ``GET /v2/lookup?out_id=KEY`` answers whether a
delivery key (``run_id:number``) was taken, so the adapter can reconcile ambiguous sends.

Usage: python tests/fake_carrier.py --host 10.231.7.2 --port 8088 --record carrier.jsonl [--delay 0.2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

TOKEN_HEADER = "Authorization"

#: the adapter's config for this carrier (``{url}`` is the carrier's base URL); secrets come from
#: DISPATCH_HTTP_SECRET_CARRIER_TOKEN as for any real provider
CARRIER_CONFIG = """\
url: {url}/v2/batch
timeout: {timeout}
headers:
  Authorization: "Bearer ${{DISPATCH_HTTP_SECRET_CARRIER_TOKEN}}"
body:
  format: json
  template:
    mobiles: "{{to_list}}"
    content: "{{body}}"
    run_id: "{{run_id}}"
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
#: the part of the config that lets the adapter ask the carrier whether it took a delivery key
LOOKUP_SECTION = """\
lookup:
  url: {url}/v2/lookup?out_id={{key}}
  message_id: data.msgid
"""


class Carrier:
    def __init__(self, record: Path, token: str, delay: float) -> None:
        self.record = record.open("a", encoding="utf-8")
        self.token = token
        self.delay = delay
        self.taken: dict[str, str] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)

    def take(self, run_id: str, numbers: list[str]) -> tuple[str, list[dict[str, Any]]]:
        with self.lock:
            call = f"b{next(self.ids)}"
            results = []
            for position, number in enumerate(numbers):
                msgid = f"{call}-{position}"
                self.taken.setdefault(f"{run_id}:{number}", msgid)
                self.record.write(json.dumps({"run_id": run_id, "to": number, "msgid": msgid}) + "\n")
                results.append({"mobile": number, "code": 0, "msgid": msgid})
            self.record.flush()
        return call, results

    def lookup(self, key: str) -> str | None:
        with self.lock:
            return self.taken.get(key)


def serve(host: str, port: int, carrier: Carrier) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if self.headers.get(TOKEN_HEADER) == f"Bearer {carrier.token}":
                return True
            self._reply(401, {"code": 401})
            return False

        def do_POST(self) -> None:
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if not self._authorised():
                return
            if urlparse(self.path).path != "/v2/batch":
                self._reply(404, {"code": 404})
                return
            call, results = carrier.take(str(data["run_id"]), [str(m) for m in data["mobiles"]])
            time.sleep(carrier.delay)  # taken and recorded: a reply lost from here on leaves an ambiguous send
            self._reply(200, {"code": 0, "data": {"batch_id": call, "results": results}})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/healthz":
                self._reply(200, {"ok": True})
                return
            if not self._authorised():
                return
            if url.path != "/v2/lookup":
                self._reply(404, {"code": 404})
                return
            msgid = carrier.lookup(parse_qs(url.query).get("out_id", [""])[0])
            if msgid is None:
                self._reply(404, {"code": 404})
            else:
                self._reply(200, {"code": 0, "data": {"msgid": msgid}})

        def log_message(self, *_args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True, help="JSON lines: every number taken")
    parser.add_argument("--token", required=True, help="the bearer token callers must present")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between taking a call and answering it")
    args = parser.parse_args()
    server = serve(args.host, args.port, Carrier(args.record, args.token, args.delay))
    print(f"listening on {args.host}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
