"""Prism serving Twilio's OpenAPI description: a real, schema-checking Twilio peer for contract tests.

``make test`` installs a pinned Prism under ``.cache/prism`` when npm is present.
The ``prism`` fixture starts it on a free port once per session and waits until it
listens; without Prism (or without ``../shared``) the tests skip locally and fail
under CI (``missing_service``). ``PrismServer.violations()`` reads Prism's log for
requests it found invalid against Twilio's schema (it answers those with 422).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, missing_service

PRISM_VERSION = "5.16.0"
SPEC = ROOT.parent / "shared" / "twilio" / "twilio_api_v2010.json"
PRISM_BIN = ROOT / ".cache" / "prism" / "node_modules" / ".bin" / "prism"
#: an account SID of the shape Twilio's schema requires (AC + 32 hex)
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "prism-test-auth-token-7f3a9c"
FROM = "+14155550100"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrismServer:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def violations(self) -> list[str]:
        """Prism's log lines that report a request breaking Twilio's schema.

        Prism answers such a request with 422, or with the operation's own 400 example
        when it has one, so the log (``[VALIDATOR] ... Violation: request...``) is the reliable
        signal. Violations of Prism's own *response* examples are not ours and are ignored.
        """
        return [
            line
            for line in self.log().splitlines()
            if "[VALIDATOR]" in line and ("Violation: request" in line or "did not pass" in line)
        ]


def _prism_command() -> list[str] | None:
    if PRISM_BIN.exists():
        return [str(PRISM_BIN)]
    found = shutil.which("prism")
    return [found] if found else None


@pytest.fixture(scope="session", name="prism")
def prism_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServer]:
    if not SPEC.exists():
        missing_service(f"Twilio OpenAPI description not found at {SPEC}")
    command = _prism_command()
    if command is None:
        missing_service(f"Prism not installed at {PRISM_BIN} (run `make test`, which installs it when npm is present)")
    assert command is not None
    port = free_port()
    log_path = tmp_path_factory.mktemp("prism") / "prism.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "mock", "-h", "127.0.0.1", "-p", str(port), str(SPEC)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
        )
    server = PrismServer(f"http://127.0.0.1:{port}", log_path, process)
    deadline = time.monotonic() + 90
    try:
        while True:
            if process.poll() is not None:
                missing_service(f"Prism exited with {process.returncode}: {server.log()[-500:]}")
            if "Prism is listening" in server.log():
                break
            if time.monotonic() > deadline:
                missing_service("Prism did not start listening within 90 s")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
