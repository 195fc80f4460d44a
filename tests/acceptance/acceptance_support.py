"""Running `dispatch` the way an operator does: the installed command, in a project folder,
with only the environment a person would have (PATH, HOME, locale) plus the documented
``DISPATCH_*`` variables the test names explicitly — nothing inherited from the test run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
#: the `dispatch` console script that `pip install -e .` put beside the interpreter running the tests
VENV_BIN = Path(sys.executable).parent
DISPATCH = VENV_BIN / "dispatch"


def person_env(**documented: str) -> dict[str, str]:
    """What a person's shell has: PATH (with the project's venv first, as after `. .venv/bin/activate`),
    HOME, a UTF-8 locale; then only the documented settings passed in."""
    path = os.pathsep.join([str(VENV_BIN), *(p for p in os.environ.get("PATH", "").split(os.pathsep) if p)])
    env = {
        "PATH": path,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    if os.environ.get("PYTHONPATH"):
        # a checkout tested with a virtual environment installed from another one: without this the
        # `dispatch` script would import the other checkout's code and this layer would test that
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(documented)
    return env


def daytime_now() -> str:
    """A DISPATCH_FAKE_NOW inside the bulk window (10:00 Shanghai today), as `make demo` sets it at night."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    return now.replace(hour=10, minute=0, second=0, microsecond=0).isoformat()


def copy_project(dest: Path) -> Path:
    """A project folder as an operator has one: the shipped campaigns and templates, nothing else."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "campaigns", dest / "campaigns")
    shutil.copytree(REPO / "templates", dest / "templates")
    return dest


def dispatch(
    cwd: Path, *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DISPATCH), *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Assert exit 0 and no traceback, showing what the operator would have seen otherwise."""
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return result


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[str] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode} first")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_ready(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGTERM, as honcho, systemd or Ctrl-C do, and the exit code; a process that ignores it fails the test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"{proc.args} did not exit within {timeout} s of SIGTERM") from None


def hidden_inputs(html: str) -> dict[str, str]:
    """The hidden fields of a form (a CSRF token, the next page), so a login posts what a browser posts."""
    import re

    fields = {}
    for tag in re.findall(r"<input[^>]*>", html):
        if 'type="hidden"' in tag:
            name = re.search(r'name="([^"]+)"', tag)
            value = re.search(r'value="([^"]*)"', tag)
            if name:
                fields[name.group(1)] = value.group(1) if value else ""
    return fields


def log_in(base: str, name: str, password: str) -> httpx.Client:
    """Log in through the login form as a browser does; the client keeps the session cookie."""
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=10)
    page = client.get("/login", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "<form" in page.text, page.text[:300]
    form = {**hidden_inputs(page.text), "name": name, "password": password}
    resp = client.post("/login", data=form, headers={"Origin": base, "Accept": "text/html"})
    assert resp.status_code in (302, 303), (resp.status_code, resp.text[:300])
    return client
