#!/usr/bin/env python3
"""Run a command with a reachable Redis: the one at DISPATCH_TEST_REDIS_URL / 127.0.0.1:6379, or a
throwaway ``redis-server`` started on a free port (and stopped afterwards).

Usage: with_redis.py COMMAND [ARGS...]. The command sees DISPATCH_TEST_REDIS_URL. When no Redis is
reachable and no redis-server binary exists, the command still runs: tests that need Redis skip
with a reason (and fail when CI is set).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse


def reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    env = dict(os.environ)
    url = env.get("DISPATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    server = None
    if not reachable(url):
        binary = shutil.which("redis-server")
        if binary:
            port = free_port()
            workdir = tempfile.mkdtemp(prefix="dispatch-redis-")
            server = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    workdir,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                if reachable(url):
                    break
                time.sleep(0.05)
            print(f"with_redis: started a throwaway redis-server on port {port}", file=sys.stderr)
        else:
            print(
                "with_redis: no Redis reachable and no redis-server installed; Redis tests will skip", file=sys.stderr
            )
    env["DISPATCH_TEST_REDIS_URL"] = url
    try:
        return subprocess.call(sys.argv[1:], env=env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
