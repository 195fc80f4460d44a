"""Every `Procfile` process, started exactly as the Procfile says, with the settings a deployment sets
(PostgreSQL, Redis, a port): it does its job, and stops cleanly (exit 0) on SIGTERM as honcho or
systemd send it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from acceptance_support import (
    REPO,
    VENV_BIN,
    copy_project,
    daytime_now,
    dispatch,
    http_ready,
    log_in,
    ok,
    person_env,
    stop,
    wait_until,
)
from prism_support import free_port


def procfile() -> dict[str, str]:
    entries = {}
    for line in (REPO / "Procfile").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def start(root: Path, command: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    argv = shlex.split(command)
    argv[0] = str(VENV_BIN / argv[0]) if (VENV_BIN / argv[0]).exists() else argv[0]
    return subprocess.Popen(argv, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def test_procfile_names_the_three_processes() -> None:
    assert set(procfile()) == {"web", "worker", "scheduler"}


@pytest.mark.slow
def test_every_procfile_process_does_its_job_and_exits_0_on_sigterm(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    root = copy_project(tmp_path / "project")
    port = free_port()
    env = person_env(
        DISPATCH_DATABASE_URL=postgres_url,
        DISPATCH_BROKER_URL=redis_url,
        # two deployments may share one Redis: each keeps its queues under its own namespace
        DISPATCH_BROKER_NAMESPACE=f"accept-{uuid.uuid4().hex[:8]}",
        DISPATCH_SESSION_SECRET="procfile-acceptance-" + uuid.uuid4().hex,
        DISPATCH_FAKE_NOW=daytime_now(),
        PORT=str(port),
    )
    ok(dispatch(root, "audience", "generate", "--size", "400", "--seed", "5", "--output", "var/r.csv", env=env))
    ok(dispatch(root, "audience", "import", "var/r.csv", env=env))
    ok(dispatch(root, "users", "add", "olga", "--role", "operator", env=env, stdin="a long operator password\n"))

    commands = procfile()
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    procs = {name: start(root, command, env, logs[name]) for name, command in commands.items()}
    try:
        # web: answers its health route and its login page, and a login reaches the dashboard
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ready(base), 30, "dispatch web to answer /healthz", procs["web"])
        assert httpx.get(base + "/healthz").json()["ok"] is True
        client = log_in(base, "olga", "a long operator password")
        assert client.get("/dashboard", headers={"Accept": "text/html"}).status_code == 200

        # scheduler: one process alone takes the lead
        wait_until(lambda: '"scheduler.leader"' in logs["scheduler"].read_text(), 30, "the scheduler to lead",
                   procs["scheduler"])  # fmt: skip

        # worker: consumes the batches of a run enqueued on Redis
        run = ok(dispatch(root, "run", "campaigns/refund-scam-lucheng.yaml", "--no-wait", env=env))
        run_id = run.stdout.strip()

        def finished() -> dict[str, object] | None:
            st = json.loads(ok(dispatch(root, "status", run_id, "--json", env=env)).stdout)
            return st if st["open"] == 0 else None

        st = wait_until(finished, 90, "the worker to send the run", procs["worker"])
        assert st["counts"].get("sent", 0) > 0 and st["counts"].get("sent") == st["total"] - st["counts"].get(
            "skipped", 0
        )
    finally:
        codes = {name: stop(proc) for name, proc in procs.items()}
    assert codes == {name: 0 for name in commands}, {n: logs[n].read_text()[-2000:] for n in commands}
    for name in commands:
        text = logs[name].read_text()
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
