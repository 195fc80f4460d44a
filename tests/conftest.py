"""Shared fixtures: real Redis, real RabbitMQ, real PostgreSQL, real `dispatch` subprocesses.

A test that needs a service that is not reachable skips with the reason locally
and fails when ``CI`` is set, so a green CI run means the real parts were used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))
REDIS_URL = os.environ.get("DISPATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: the RabbitMQ server (its default vhost); each test gets a vhost of its own on it (``rabbitmq_url``)
RABBITMQ_URL = os.environ.get("DISPATCH_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get("DISPATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll until ``predicate`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def wait_started(*logs: Path, timeout: float = 30) -> None:
    """Wait until each `dispatch worker` logging to ``logs`` has logged ``worker.started`` (it consumes from
    then on): a run enqueued earlier may all go to a worker that was quicker to start."""
    for log in logs:
        wait_for(lambda log=log: "worker.started" in log.read_text(), timeout, f"the worker of {log.name} to start")


def stop_processes(procs: Iterable[subprocess.Popen[str]], timeout: float = 30) -> None:
    """SIGTERM each process still running (workers finish in-flight batches), then wait; kill stragglers."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def missing_service(reason: str) -> None:
    """Skip locally, fail in CI: a CI run must exercise the real service."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def _port_open(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("postgresql+psycopg", "postgresql"))
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        missing_service(f"Redis not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


#: vhosts being deleted in the background (a test does not wait for its vhost to go); reaped at session end
_VHOST_DELETES: list[subprocess.Popen[bytes]] = []


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def rabbitmq_available() -> Iterator[str]:
    """The RabbitMQ server's URL, once it answers AMQP and ``rabbitmqctl`` can manage its vhosts."""
    import pika
    import pika.exceptions

    try:
        pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL + "?connection_attempts=1&socket_timeout=2")).close()
    except pika.exceptions.AMQPError as exc:
        from dispatcher.broker import amqp_reason
        from dispatcher.redact import mask_url

        missing_service(f"RabbitMQ not reachable at {mask_url(RABBITMQ_URL)}: {amqp_reason(exc)}")
    if shutil.which("rabbitmqctl") is None:
        missing_service("rabbitmqctl is not installed: the RabbitMQ tests isolate themselves in vhosts")
    check = _rabbitmqctl("list_vhosts")
    if check.returncode != 0:
        missing_service(f"rabbitmqctl cannot manage the server: {check.stderr.strip()[:200]}")
    yield RABBITMQ_URL
    for proc in _VHOST_DELETES:
        proc.wait(60)


def add_vhost(vhost: str, user: str) -> None:
    """Create ``vhost`` and let ``user`` configure, write and read everything in it.

    One ``rabbitmqctl eval`` (one Erlang VM start, ~0.5 s quiet, ~1 s on a loaded host) instead of
    ``add_vhost`` + ``set_permissions`` (two starts); the internal functions it calls may change
    between RabbitMQ versions, so the two documented commands are the fallback.
    """
    erlang = (
        f'rabbit_vhost:add(<<"{vhost}">>, <<"tests">>), rabbit_auth_backend_internal:set_permissions('
        f'<<"{user}">>, <<"{vhost}">>, <<".*">>, <<".*">>, <<".*">>, <<"tests">>).'
    )
    quick = _rabbitmqctl("eval", erlang)
    if quick.returncode == 0 and quick.stdout.strip() == "ok":
        return
    added = _rabbitmqctl("add_vhost", vhost)
    assert added.returncode == 0, added.stderr
    granted = _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    assert granted.returncode == 0, granted.stderr


def empty_vhost(url: str) -> None:
    """What a RabbitMQ server that lost its data looks like to its clients: the URL's vhost is deleted
    (every queue, message and connection in it gone) and made again, empty."""
    parsed = urlparse(url)
    vhost = parsed.path.lstrip("/")
    deleted = _rabbitmqctl("delete_vhost", vhost)
    assert deleted.returncode == 0, deleted.stderr
    add_vhost(vhost, parsed.username or "guest")


@pytest.fixture
def rabbitmq_url(rabbitmq_available: str) -> Iterator[str]:
    """A RabbitMQ URL on a fresh vhost, deleted after the test.

    A vhost is RabbitMQ's namespace: queues of the same name in two vhosts are separate, so the
    lanes keep their production names and a stray worker of another test (or of another test
    session on this machine) never takes this test's messages. ``rabbitmqctl`` starts an Erlang
    VM each call: about 0.8 s to add a vhost and grant it; the delete runs in the background.
    """
    parsed = urlparse(rabbitmq_available)
    vhost = f"dispatch-test-{uuid.uuid4().hex[:8]}"
    add_vhost(vhost, parsed.username or "guest")
    yield f"{parsed.scheme}://{parsed.netloc}/{vhost}"
    deleting = subprocess.Popen(
        ["rabbitmqctl", "-q", "delete_vhost", vhost], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _VHOST_DELETES.append(deleting)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each test about the networked broker's behaviour runs on Redis and on RabbitMQ."""
    return str(request.param)


@pytest.fixture
def broker_url(request: pytest.FixtureRequest, broker_kind: str) -> str:
    """The shared Redis (isolated by the project's namespace) or a fresh RabbitMQ vhost."""
    return str(request.getfixturevalue("redis_url" if broker_kind == "redis" else "rabbitmq_url"))


@pytest.fixture(scope="session")
def postgres_available() -> str:
    if not _port_open(POSTGRES_URL, 5432):
        missing_service(f"PostgreSQL not reachable at {POSTGRES_URL}")
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_available: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(postgres_available)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in postgres_available else "?"
    yield f"{postgres_available}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs against SQLite and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dispatch.db'}"
    return str(request.getfixturevalue("postgres_url"))


@dataclass
class Project:
    """A working folder with the shipped campaigns, templates, organisation and themes, and the env a command sees."""

    root: Path
    env: dict[str, str]
    runtimes: list[Runtime] = field(default_factory=list)

    @property
    def outbox(self) -> Path:
        return self.root / self.env["DISPATCH_OUTBOX_PATH"]

    def settings(self, **overrides: Any) -> Settings:
        """Settings as a command in this project sees them, with paths made absolute for in-process use."""
        absolute = {
            "DISPATCH_OUTBOX_PATH": str(self.outbox),
            "DISPATCH_TEMPLATES_DIR": str(self.root / "templates"),
            "DISPATCH_CAMPAIGNS_DIR": str(self.root / "campaigns"),
        }
        return Settings.from_env({**self.env, **absolute, **overrides})

    def runtime(self, **kwargs: Any) -> Runtime:
        cwd = Path.cwd()
        os.chdir(self.root)  # relative paths in settings resolve against the project
        try:
            rt = Runtime(self.settings(), **kwargs)
            rt.store  # noqa: B018 - open while in the project folder
        finally:
            os.chdir(cwd)
        self.runtimes.append(rt)
        return rt

    def dispatch(
        self, *args: str, timeout: float = 180, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `dispatch` command in a subprocess (``input``: its standard input, e.g. a password)."""
        return subprocess.run(
            [sys.executable, "-m", "dispatcher", *args],
            cwd=self.root,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def popen(self, *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *args],
            cwd=self.root,
            env={**self.env, **(env or {})},
            text=True,
            **kwargs,
        )

    def approve(self, relative: str) -> str:
        """Approve the campaign file's current version as two operators (``approve_campaign``)."""
        return approve_campaign(self.runtime(), self.root / relative)

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def registry(self, size: int = 500, seed: int = 1) -> Path:
        csv_path = self.root / "var" / f"residents-{size}-{seed}.csv"
        gen = self.dispatch("audience", "generate", "--size", str(size), "--seed", str(seed), "--output", str(csv_path))
        assert gen.returncode == 0, gen.stderr
        imp = self.dispatch("audience", "import", str(csv_path))
        assert imp.returncode == 0, imp.stderr
        return csv_path


#: the two operators the shared approval helper creates: one submits a campaign version, the other approves it
AUTHOR, APPROVER = "approval-author", "approval-second"
OPERATOR_PASSWORD = "correct horse battery"


def approve_campaign(rt: Runtime, path: Path | str) -> str:
    """Approve the campaign's current version the way operators do; returns the version.

    Two operator accounts (created once), each proving its password through the login check
    the command line uses; the first submits the version, the second approves it. Runs of the
    campaign through a real gateway (Twilio, HTTP, Kannel, failover lists) are refused without it.
    """
    from dispatcher import approvals
    from dispatcher.accounts import add_user, get, login
    from dispatcher.campaigns import load_campaign

    proven = []
    for name in (AUTHOR, APPROVER):
        if get(rt.store, name) is None:
            add_user(rt.store, name, "operator", OPERATOR_PASSWORD)
        account = login(rt.store, name, OPERATOR_PASSWORD, "cli")
        assert account is not None and account.role == "operator"
        proven.append(account.name)
    loaded = load_campaign(Path(path), rt.settings.templates_dir, rt.clock(), gateways=rt.known_gateways())
    approvals.submit(rt, loaded, by=proven[0])
    _outcome, row = approvals.approve(rt, loaded, by=proven[1])
    return row.version


def daytime_offset(hour: int = 10) -> float:
    """Seconds to add to the clock so that it reads a weekday-independent daytime hour in Asia/Shanghai.

    Bulk sends only go out 08:00-21:00 Shanghai time; tests that are not about the window run
    at 10:00 whatever the real hour is (0 when it is already daytime there). Tests about the
    window set DISPATCH_FAKE_NOW / DISPATCH_CLOCK_OFFSET themselves, which override this.
    """
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    if 8 <= now.hour < 20:
        return 0.0
    target = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    if target < now:
        target += timedelta(days=1)
    return (target - now).total_seconds()


def _base_env(root: Path, database_url: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "TWILIO_"))}
    return {
        **keep,
        "PYTHONPATH": str(ROOT),
        "DISPATCH_DATABASE_URL": database_url,
        "DISPATCH_OUTBOX_PATH": "var/outbox.jsonl",
        "DISPATCH_LOG_FORMAT": "json",
        "DISPATCH_BROKER_NAMESPACE": f"dispatch-test-{uuid.uuid4().hex[:8]}",
        "DISPATCH_CLOCK_OFFSET": str(daytime_offset()),
    }


def _make_project(root: Path, database_url: str) -> Project:
    shutil.copytree(ROOT / "campaigns", root / "campaigns")
    shutil.copytree(ROOT / "templates", root / "templates")
    for name in ("organisation.yaml", "themes.yaml"):  # the organisation and plan periods campaigns refer to
        shutil.copy(ROOT / name, root / name)
    (root / "var").mkdir()
    return Project(root=root, env=_base_env(root, database_url))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    """A project on SQLite and the embedded broker."""
    p = _make_project(tmp_path / "project", f"sqlite:///{tmp_path / 'project' / 'var' / 'dispatch.db'}")
    yield p
    for rt in p.runtimes:
        rt.close()


@pytest.fixture
def any_db_project(tmp_path: Path, database_url: str) -> Iterator[Project]:
    """A project on SQLite or PostgreSQL (parametrised)."""
    p = _make_project(tmp_path / "project", database_url)
    yield p
    for rt in p.runtimes:
        rt.close()


@pytest.fixture
def redis_project(tmp_path: Path, redis_url: str, postgres_url: str) -> Iterator[Project]:
    """A project on PostgreSQL and Redis, as production runs."""
    p = _make_project(tmp_path / "project", postgres_url)
    p.env["DISPATCH_BROKER_URL"] = redis_url
    yield p
    for rt in p.runtimes:
        rt.close()
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{p.env['DISPATCH_BROKER_NAMESPACE']}*"):
        client.delete(key)


@pytest.fixture
def broker_project(tmp_path: Path, broker_kind: str, broker_url: str, postgres_url: str) -> Iterator[Project]:
    """A project on PostgreSQL and Redis or RabbitMQ (parametrised by ``broker_kind``).

    On RabbitMQ there is no DISPATCH_REDIS_URL: the rate limiter and the scheduler's lease are the
    database's, the set-up a deployment without Redis runs.
    """
    p = _make_project(tmp_path / "project", postgres_url)
    p.env["DISPATCH_BROKER_URL"] = broker_url
    yield p
    for rt in p.runtimes:
        rt.close()
    if broker_kind == "redis":
        import redis

        client = redis.Redis.from_url(broker_url)
        for key in client.scan_iter(f"{p.env['DISPATCH_BROKER_NAMESPACE']}*"):
            client.delete(key)


# ------------------------------------------------------------------ artifacts for humans

#: screenshots and other files tests save for a person to look at (the dashboard's heat map)
ARTIFACTS_DIR = ROOT / "test-artifacts"
#: conftest is imported as the run starts; anything in the folder older than that is from an earlier run
_SESSION_STARTED = time.time()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the path of every artifact written during this run: `make test` output shows where they are."""
    if not ARTIFACTS_DIR.is_dir():
        return
    started = _SESSION_STARTED
    fresh = sorted(p for p in ARTIFACTS_DIR.iterdir() if p.is_file() and p.stat().st_mtime >= started)
    if fresh:
        terminalreporter.section("test artifacts")
        for path in fresh:
            terminalreporter.write_line(f"saved: {path}")


# ------------------------------------------------------------------ the web process


@contextmanager
def serve_web(project: Project, log: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`dispatch web` on a free port, answering /healthz, its output written to ``log``; stopped afterwards."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = {
        "DISPATCH_SESSION_SECRET": "s-" + os.urandom(24).hex(),
        "DISPATCH_FAKE_NOW": "2021-02-15T10:00:00+08:00",
    }
    with log.open("w") as out:
        proc = project.popen("web", "--port", str(port), env={**settings, **env}, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dispatch web did not start: {log.read_text()}")
        time.sleep(0.2)
    try:
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
