#!/usr/bin/env python3
"""Twilio throughput: 2 ``dispatch worker`` processes against the ``twilio`` library's async client alone.

A local Twilio-compatible provider (aiohttp, in its own process so it never competes with either
sender for the GIL) answers ``POST /2010-04-01/Accounts/{sid}/Messages.json`` with a valid Twilio
message after ``--latency`` seconds (150 ms), and counts requests per ``To`` number and the most
requests it ever held at once. Then:

(a) a campaign of ``--size`` recipients (approved by two operators: Twilio is a real gateway) is
    sent by ``--workers`` real ``dispatch worker`` processes (Redis broker with its own namespace,
    PostgreSQL store, ``DISPATCH_GATEWAY=twilio`` pointed at the provider by
    ``DISPATCH_TWILIO_BASE_URL``, a rate limit far above what is reached);
(b) the ``twilio`` library alone sends as many messages with ``AsyncTwilioHttpClient``, 100 requests
    in flight, to the same provider.

Prints both rates (messages the provider answered per second, first request to last answer),
the ratio (target: at least 80 %), the most requests in flight the provider saw in each, and
"sent twice" from the provider's per-number counts. Needs PostgreSQL and Redis (bench/_harness.py).

    .venv/bin/python bench/bench_twilio_concurrency.py [--size 3000] [--workers 2] [--concurrency 50] [--batch-size 250]

BENCH_PROFILE=/tmp/prof (py-spy on PATH) writes py-spy samples of each worker while it sends (of the thread
holding the GIL: where its Python CPU goes), BENCH_PROFILE_SECONDS long (15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from email.utils import formatdate
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BenchProject, wait_for

from dispatcher.settings import Settings

ACCOUNT_SID = "AC" + "0f" * 16
AUTH_TOKEN = "bench-token-" + "7e" * 10
FROM = "+15005550006"

CAMPAIGN = """\
id: bench-twilio
title: 冒充客服退款诈骗预警（基准）
owner: 公安分局
template: themes/refund.sms.j2
variables:
  hotline: "96110"
audience:
  districts: all
"""


# ---------------------------------------------------------------- the provider (its own process)


def serve(latency: float) -> None:
    """A Twilio-compatible Messages endpoint on 127.0.0.1; prints its port, then serves until killed."""
    from aiohttp import web

    state: dict[str, Any] = {}

    def reset() -> None:
        state.update(per_to={}, in_flight=0, max_in_flight=0, first=None, last=None, requests=0)

    reset()

    async def create(request: web.Request) -> web.Response:
        form = await request.post()
        now = time.monotonic()
        if state["first"] is None:
            state["first"] = now
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(latency)
        finally:
            state["in_flight"] -= 1
        to = str(form.get("To", ""))
        state["per_to"][to] = state["per_to"].get(to, 0) + 1
        state["requests"] += 1
        state["last"] = time.monotonic()
        sid = "SM" + secrets.token_hex(16)
        account = request.match_info["sid"]
        stamp = formatdate(usegmt=True)
        body = {
            "sid": sid,
            "account_sid": account,
            "to": to,
            "from": str(form.get("From", "")) or None,
            "messaging_service_sid": str(form.get("MessagingServiceSid", "")) or None,
            "body": str(form.get("Body", "")),
            "status": "queued",
            "direction": "outbound-api",
            "num_segments": "1",
            "num_media": "0",
            "api_version": "2010-04-01",
            "date_created": stamp,
            "date_updated": stamp,
            "date_sent": None,
            "price": None,
            "price_unit": "USD",
            "error_code": None,
            "error_message": None,
            "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"},
        }
        return web.json_response(body, status=201)

    async def stats(_request: web.Request) -> web.Response:
        counts = state["per_to"].values()
        elapsed = (state["last"] - state["first"]) if state["first"] is not None and state["last"] else 0.0
        return web.json_response(
            {
                "requests": state["requests"],
                "numbers": len(state["per_to"]),
                "sent_twice": sum(1 for n in counts if n > 1),
                "max_in_flight": state["max_in_flight"],
                "elapsed": elapsed,
                "idle_for": time.monotonic() - state["last"] if state["last"] else None,
            }
        )

    async def do_reset(_request: web.Request) -> web.Response:
        reset()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", create)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", do_reset)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"port {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class ProviderProcess:
    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--latency", str(latency)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("port "):
            raise SystemExit(f"the provider did not start: {line!r}")
        self.url = f"http://127.0.0.1:{line.split()[1]}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as response:
            return dict(json.loads(response.read()))

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/reset", method="POST"), timeout=10).close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def settled(provider: ProviderProcess, expected: int, timeout: float) -> dict[str, Any]:
    """The provider's stats once it has answered ``expected`` requests and heard nothing for a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = provider.stats()
        if stats["requests"] >= expected and (stats["idle_for"] or 0) > 1.0:
            return stats
        time.sleep(0.5)
    raise SystemExit(f"timed out: the provider answered {provider.stats()['requests']} of {expected}")


# ---------------------------------------------------------------- (a) dispatch workers


def profile(procs: list[subprocess.Popen[str]]) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PROFILE set, py-spy samples of each worker while it sends (the thread holding the GIL)."""
    if not os.environ.get("BENCH_PROFILE"):
        return []
    seconds = os.environ.get("BENCH_PROFILE_SECONDS", "15")
    out = os.environ["BENCH_PROFILE"]
    spy = ["py-spy", "record", "--gil", "--format", "raw", "--rate", "200", "--nonblocking", "--duration", seconds]
    return [
        subprocess.Popen(
            [*spy, "-o", f"{out}-{i}.txt", "--pid", str(p.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for i, p in enumerate(procs)
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dispatch_workers(args: argparse.Namespace, provider: ProviderProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    project = BenchProject(
        DISPATCH_GATEWAY="twilio",
        DISPATCH_TWILIO_BASE_URL=provider.url,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_FROM=FROM,
        DISPATCH_PUBLIC_URL="https://dispatch.example.org",
        DISPATCH_RATE_LIMIT="100000",  # far above what is reached: the provider's latency is the limit
        DISPATCH_GATEWAY_CONCURRENCY=str(args.concurrency),
        DISPATCH_BATCH_SIZE=str(args.batch_size),
        DISPATCH_LOG_LEVEL="INFO",
    )
    try:
        (project.root / "campaigns" / "bench-twilio.yaml").write_text(CAMPAIGN, encoding="utf-8")
        project.registry(args.size, seed=7)
        password = secrets.token_urlsafe(18) + "\n"
        # a Twilio run is a real send: only a version a second operator approved goes out
        for argv in (
            ("users", "add", "bench-author", "--role", "operator"),
            ("users", "add", "bench-approver", "--role", "operator"),
            ("submit", "campaigns/bench-twilio.yaml", "--as", "bench-author"),
            ("approve", "campaigns/bench-twilio.yaml", "--as", "bench-approver"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "dispatcher", *argv], cwd=project.root, env=project.env,
                input=password, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"dispatch {' '.join(argv)} failed: {done.stderr}")
        for i in range(args.workers):
            project.popen("worker", "--threads", str(args.threads), log=f"worker-{i}.log")
        for i in range(args.workers):
            project.wait_log(f"worker-{i}.log", "worker.started")
        profilers = profile(project.procs)
        provider.reset()
        started = time.monotonic()
        run = json.loads(project.dispatch("run", "campaigns/bench-twilio.yaml", "--no-wait", "--json").stdout)
        status: dict[str, Any] = {}

        def finished() -> bool:
            status.update(json.loads(project.dispatch("status", run["run_id"], "--json").stdout))
            return status.get("status") == "completed"

        cpu_before = [cpu_seconds(p.pid) for p in project.procs]
        stats = settled(provider, 1, 600)
        cpu = sum(cpu_seconds(p.pid) for p in project.procs) - sum(cpu_before)
        wait_for(finished, 600, "the run to complete", every=2.0)
        for prof in profilers:
            prof.wait(120)
        stats = provider.stats()
        stats["worker_cpu"] = cpu
        stats["wall"] = time.monotonic() - started
        stats["run"] = {"total": run["total"], "batches": run["batches"], "counts": status.get("counts")}
        return stats, status
    finally:
        project.close()


# ---------------------------------------------------------------- (b) the twilio library alone


def twilio_alone(args: argparse.Namespace, provider: ProviderProcess, count: int) -> dict[str, Any]:
    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.rest import Client

    class LocalAsyncClient(AsyncTwilioHttpClient):  # type: ignore[misc]
        """The library's async client, its requests sent to the local provider instead of api.twilio.com."""

        async def request(self, method: str, url: str, *a: Any, **kw: Any) -> Any:
            return await super().request(method, url.replace("https://api.twilio.com", provider.url), *a, **kw)

    async def main() -> None:
        http = LocalAsyncClient()
        client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http)
        gate = asyncio.Semaphore(args.in_flight)

        async def one(n: int) -> None:
            async with gate:
                await client.messages.create_async(to=f"+1555{n:07d}", from_=FROM, body="请警惕冒充客服退款诈骗")

        await asyncio.gather(*(one(n) for n in range(count)))
        await http.close()

    provider.reset()
    started, cpu = time.monotonic(), time.process_time()
    asyncio.run(main())
    cpu = time.process_time() - cpu
    stats = settled(provider, count, 600)
    stats["wall"] = time.monotonic() - started
    stats["cpu"] = cpu
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3000, help="recipients in the registry")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=Settings.worker_threads, help="worker threads per dispatch worker"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="DISPATCH_GATEWAY_CONCURRENCY")
    parser.add_argument("--batch-size", type=int, default=250, help="DISPATCH_BATCH_SIZE (rows per batch)")
    parser.add_argument("--in-flight", type=int, default=100, help="requests the twilio library keeps in flight")
    parser.add_argument("--latency", type=float, default=0.15, help="seconds the provider takes to answer")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.latency)
        return 0
    import os

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    provider = ProviderProcess(args.latency)
    try:
        a, status = dispatch_workers(args, provider)
        b = twilio_alone(args, provider, a["requests"])
    finally:
        provider.close()
    rate_a = a["requests"] / a["elapsed"] if a["elapsed"] else 0.0
    rate_b = b["requests"] / b["elapsed"] if b["elapsed"] else 0.0
    print(f"provider latency {args.latency * 1000:.0f} ms; registry {args.size}; run {a['run']}")
    print(
        f"(a) {args.workers} dispatch workers x {args.threads} threads, DISPATCH_GATEWAY_CONCURRENCY="
        f"{args.concurrency}, DISPATCH_BATCH_SIZE={args.batch_size}: {a['requests']} messages in "
        f"{a['elapsed']:.2f} s = {rate_a:.0f} msg/s "
        f"(first request to last answer; {a['wall']:.1f} s from `dispatch run` to the run completed); "
        f"max in flight {a['max_in_flight']}; sent twice: {a['sent_twice']}; the workers used "
        f"{a['worker_cpu']:.1f} CPU seconds ({a['worker_cpu'] / a['requests'] * 1000:.2f} ms a message)"
    )
    print(
        f"(b) twilio AsyncTwilioHttpClient, {args.in_flight} in flight: {b['requests']} messages in "
        f"{b['elapsed']:.2f} s = {rate_b:.0f} msg/s; max in flight {b['max_in_flight']}; sent twice: "
        f"{b['sent_twice']}; the client used {b['cpu']:.1f} CPU seconds "
        f"({b['cpu'] / b['requests'] * 1000:.2f} ms a message)"
    )
    ratio = rate_a / rate_b if rate_b else 0.0
    print(f"{'PASS' if ratio >= 0.8 else 'FAIL'} ratio (a)/(b): {ratio:.0%} (target >= 80%)")
    twice = a["sent_twice"] + b["sent_twice"]
    print(f"{'PASS' if twice == 0 else 'FAIL'} sent twice: {twice}")
    sent = (status.get("counts") or {}).get("sent", 0)
    if sent != a["requests"]:
        print(f"WARNING: {sent} rows sent in the log, {a['requests']} requests seen by the provider")
    return 0 if ratio >= 0.8 and twice == 0 and sent == a["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
