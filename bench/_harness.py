"""Shared set-up of the benchmarks: a throwaway project on real PostgreSQL and Redis, and real
``dispatch`` subprocesses. Nothing here is mocked; figures are printed, not asserted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("DISPATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("DISPATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class BenchProject:
    """A temp folder with the shipped campaigns and templates, a new PostgreSQL schema, a Redis namespace."""

    def __init__(self, **env: str) -> None:
        import sqlalchemy as sa

        self.root = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
        shutil.copytree(ROOT / "campaigns", self.root / "campaigns")
        shutil.copytree(ROOT / "templates", self.root / "templates")
        (self.root / "var").mkdir()
        self.schema = f"bench_{uuid.uuid4().hex[:10]}"
        self._engine = sa.create_engine(POSTGRES_URL)
        with self._engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "TWILIO_"))}
        self.env = {
            **keep,
            "PYTHONPATH": str(ROOT),
            "DISPATCH_DATABASE_URL": f"{POSTGRES_URL}?options=-csearch_path%3D{self.schema}",
            "DISPATCH_BROKER_URL": REDIS_URL,
            "DISPATCH_BROKER_NAMESPACE": f"dispatch-bench-{uuid.uuid4().hex[:8]}",
            "DISPATCH_OUTBOX_PATH": "var/outbox.jsonl",
            "DISPATCH_LOG_FORMAT": "json",
            "DISPATCH_LOG_LEVEL": "INFO",
            # benchmarks measure throughput, not the 08:00-21:00 rule or the weekly cap
            "DISPATCH_SEND_WINDOW": "ignore",
            "DISPATCH_FREQUENCY_CAP_MAX": "0",
            **env,
        }
        self.procs: list[subprocess.Popen[str]] = []

    @property
    def outbox(self) -> Path:
        return self.root / "var" / "outbox.jsonl"

    def dispatch(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", *args],
            cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"dispatch {' '.join(args)} failed: {result.stderr}")
        return result

    def popen(self, *args: str, log: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *args],
            cwd=self.root, env={**self.env, **(env or {})}, text=True,
            stdout=(self.root / "var" / log).open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def wait_log(self, log: str, needle: str, timeout: float = 60) -> None:
        wait_for(lambda: needle in (self.root / "var" / log).read_text(), timeout, f"{needle} in {log}")

    def registry(self, size: int, seed: int = 1) -> None:
        csv = self.root / "var" / "residents.csv"
        self.dispatch("audience", "generate", "--size", str(size), "--seed", str(seed), "--output", str(csv))
        self.dispatch("audience", "import", str(csv))

    def close(self) -> None:
        import redis
        import sqlalchemy as sa

        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        with self._engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{self.schema}" CASCADE'))
        self._engine.dispose()
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{self.env['DISPATCH_BROKER_NAMESPACE']}*"):
            client.delete(key)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")
