"""Fault-injection fixtures and checks: private Redis and PostgreSQL instances the tests stop, restart and kill.

Never the shared services on 6379/5432: each fault test owns what it breaks. PostgreSQL
is one private cluster for the session (initdb takes seconds) with a fresh database per
test; a test that stops it starts it again before it ends. Redis is one private server
per test (it starts in milliseconds), started with no persistence so a restart is empty.

RabbitMQ is the shared server with a fresh vhost per test (``pg_broker_project``), never a
private one: a RabbitMQ node takes seconds to boot and wants its own Erlang node name and
data directory, so the tests that kill or restart the broker stay on the private Redis.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Project, _make_project, missing_service, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside the network namespace ``netns`` (``ip netns exec``), or as is for None."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


@dataclass
class PrivateRedis:
    """A private redis-server bound to ``host`` (started inside network namespace ``netns`` when given)."""

    port: int
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    netns: str | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            missing_service("redis-server is not installed")
        assert exe is not None
        argv = [exe, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        if self.host != "127.0.0.1":
            argv += ["--protected-mode", "no"]  # other hosts of a test network: redis refuses them by default
        self.proc = subprocess.Popen(in_netns(self.netns, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open(self.port, self.host), 10, f"private redis on {self.host}:{self.port}")

    def kill(self) -> None:
        """SIGKILL: the broker is gone with everything it held (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class PrivatePostgres:
    """A private PostgreSQL cluster listening on ``host`` (its server started inside ``netns`` when given)."""

    root: Path
    port: int
    bindir: Path
    databases: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    netns: str | None = None

    @property
    def base_url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}"

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        pg_ctl = ["runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"), "-D", str(self.root / "data")]
        # the postmaster forked by `start` stays in the namespace it was started in
        subprocess.run(in_netns(self.netns, [*pg_ctl, *args]), check=True, capture_output=True, timeout=timeout)

    def start(self) -> None:
        self._ctl("-l", str(self.root / "log"), "-w", "start")
        wait_for(lambda: _port_open(self.port, self.host), 30, f"private postgres on {self.host}:{self.port}")

    def stop(self) -> None:
        """Fast shutdown: every session is cut, as in an outage."""
        self._ctl("-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return _port_open(self.port, self.host)

    def new_database(self) -> str:
        import sqlalchemy as sa

        name = f"f_{uuid.uuid4().hex[:10]}"
        engine = sa.create_engine(f"{self.base_url}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        self.databases.append(name)
        return f"{self.base_url}/{name}"

    def destroy(self) -> None:
        """Immediate stop (whatever state the test left it in) and the cluster's files removed."""
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def init_postgres(host: str = "127.0.0.1", netns: str | None = None, port: int | None = None) -> PrivatePostgres:
    """initdb a private cluster listening on ``host`` only, start it (inside ``netns`` if given) and return it."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or shutil.which("runuser") is None:
        missing_service("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="dispatch-faults-pg-"))
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")
    port = port or free_port()
    subprocess.run(
        ["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust",
         "-U", "postgres", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    conf = root / "data" / "postgresql.conf"
    with conf.open("a") as fh:
        fh.write(
            f"\nport = {port}\nlisten_addresses = '{host}'\nunix_socket_directories = '{root}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
        )
    with (root / "data" / "pg_hba.conf").open("a") as fh:
        fh.write("host all all samenet trust\n")  # the other hosts of a test network (its /24)
    pg = PrivatePostgres(root=root, port=port, bindir=bindir, host=host, netns=netns)
    try:
        pg.start()
    except BaseException:
        pg.destroy()
        raise
    return pg


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = init_postgres()
    yield pg
    pg.destroy()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis(port=free_port())
    redis.start()
    yield redis
    redis.kill()


@pytest.fixture
def pg_redis_project(
    tmp_path: Path, private_postgres: PrivatePostgres, private_redis: PrivateRedis
) -> Iterator[Project]:
    """Production shape on private services: PostgreSQL, Redis, `dispatch worker` processes."""
    if not private_postgres.running():
        private_postgres.start()
    p = _make_project(tmp_path / "project", private_postgres.new_database())
    p.env["DISPATCH_BROKER_URL"] = private_redis.url
    p.env["DISPATCH_SEND_WINDOW"] = "ignore"
    yield p
    for rt in p.runtimes:
        rt.close()


@pytest.fixture
def pg_broker_project(
    request: pytest.FixtureRequest, tmp_path: Path, private_postgres: PrivatePostgres, broker_kind: str
) -> Iterator[Project]:
    """``pg_redis_project``, or the same on a fresh vhost of the shared RabbitMQ (parametrised by ``broker_kind``).

    For faults of the workers and the database, not of the broker: nothing here kills RabbitMQ.
    """
    if not private_postgres.running():
        private_postgres.start()
    if broker_kind == "redis":
        url = request.getfixturevalue("private_redis").url
    else:
        url = request.getfixturevalue("rabbitmq_url")
    p = _make_project(tmp_path / "project", private_postgres.new_database())
    p.env["DISPATCH_BROKER_URL"] = url
    p.env["DISPATCH_SEND_WINDOW"] = "ignore"
    yield p
    for rt in p.runtimes:
        rt.close()


@pytest.fixture
def sqlite_project(tmp_path: Path) -> Iterator[Project]:
    """Embedded broker on SQLite: `dispatch run` sends in-process."""
    p = _make_project(tmp_path / "project", f"sqlite:///{tmp_path / 'project' / 'var' / 'dispatch.db'}")
    p.env["DISPATCH_SEND_WINDOW"] = "ignore"
    yield p
    for rt in p.runtimes:
        rt.close()


# ------------------------------------------------------------------ processes and checks

CAMPAIGN = "campaigns/quarterly-themes.yaml"


def worker(project: Project, name: str, env: dict[str, str] | None = None, threads: int = 2) -> subprocess.Popen[str]:
    log = (project.root / "var" / f"{name}.log").open("w")
    return project.popen("worker", "--threads", str(threads), env=env, stdout=log, stderr=subprocess.STDOUT)


def status(project: Project, run_id: str) -> dict[str, Any]:
    result = project.dispatch("status", run_id, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def start_run(project: Project, *args: str) -> str:
    result = project.dispatch("run", CAMPAIGN, "--no-wait", "--json", *args, timeout=120)
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["run_id"])


def wait_done(project: Project, run_id: str, timeout: float) -> dict[str, Any]:
    """Poll until nothing of the run is pending or sending (unknown rows wait for an operator)."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.update(status(project, run_id))
        return seen["counts"].get("pending", 0) == 0 and seen["counts"].get("sending", 0) == 0

    try:
        wait_for(done, timeout, f"run {run_id} to finish", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last status counts {seen.get('counts')}") from None
    return seen


@dataclass
class Recovery:
    """What a scenario's checks found after recovery (one row of the report's table)."""

    eligible: int
    keys_in_gateway: int
    sent_twice: int
    lost: int
    stranded: int
    handovers_in_ledger: int
    outbox_lines: int
    verify_ok: bool

    def row(self) -> str:
        return (
            f"eligible {self.eligible}, keys in gateway {self.keys_in_gateway} "
            f"(once {self.keys_in_gateway - self.sent_twice}), sent twice {self.sent_twice}, lost {self.lost}, "
            f"stranded {self.stranded}, ledger hand-overs {self.handovers_in_ledger}/{self.outbox_lines} "
            f"outbox lines, verify {'ok' if self.verify_ok else 'BROKEN'}"
        )


def check_recovery(project: Project, run_id: str, *, expected: set[str] | None = None) -> Recovery:
    """Every eligible key in the gateway exactly once, nothing pending/sending, one ledger event per
    hand-over, `dispatch audit verify` passing. ``expected``: the keys that must have gone out
    (default: every row not opted out)."""
    import sqlalchemy as sa

    from dispatcher.providers.outbox.gateway import read_outbox
    from dispatcher.store import ledger
    from dispatcher.store import schema as t

    lines = [line for line in read_outbox(project.outbox) if line["run_id"] == run_id]
    keys = collections.Counter(line["key"] for line in lines)
    rt = project.runtime()
    rows = list(rt.store.deliveries(run_id))
    if expected is None:
        expected = {r.key for r in rows if r.reason != "opted_out"}
    with rt.store.engine.connect() as conn:
        e = t.events
        handovers = conn.execute(
            sa.select(sa.func.count()).where(
                e.c.run_id == run_id,
                sa.or_(
                    sa.and_(e.c.kind == "delivery.state", e.c.from_state == "sending", e.c.to_state == "sent"),
                    sa.and_(e.c.kind == "delivery.state", e.c.reason == "late_result"),
                    sa.and_(e.c.kind == "delivery.late", e.c.to_state == "sent"),
                ),
            )
        ).scalar_one()
        # a worker's results are one event per batch: each row it names sent is a hand-over
        for kind, from_state, payload in conn.execute(
            sa.select(e.c.kind, e.c.from_state, e.c.payload).where(e.c.run_id == run_id, e.c.kind == ledger.RECORD_KIND)
        ):
            handovers += sum(1 for c in ledger.row_changes(kind, from_state, None, payload) if c.to_state == "sent")
    verify = project.dispatch("audit", "verify", run_id, "--json", timeout=120)
    result = Recovery(
        eligible=len(expected),
        keys_in_gateway=len(keys),
        sent_twice=sum(1 for n in keys.values() if n > 1),
        lost=len(expected - set(keys)),
        stranded=sum(1 for r in rows if r.state in ("pending", "sending")),
        handovers_in_ledger=int(handovers),
        outbox_lines=len(lines),
        verify_ok=verify.returncode == 0,
    )
    print(f"\nrecovery {run_id}: {result.row()}")
    report = os.environ.get("DISPATCH_FAULTS_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), **result.__dict__}) + "\n")
    assert result.sent_twice == 0, f"sent twice: {[k for k, n in keys.items() if n > 1][:5]}"
    lost_rows = [
        {k: r[k] for k in ("key", "state", "reason", "error_code", "attempts", "claimed_by")}
        for r in rows
        if r.key in expected - set(keys)
    ]
    assert result.lost == 0, f"lost: {lost_rows[:5]}"
    assert set(keys) <= expected, f"unexpected keys: {sorted(set(keys) - expected)[:5]}"
    assert result.stranded == 0, "rows left pending/sending"
    assert result.handovers_in_ledger == result.outbox_lines, "the ledger must hold one event per hand-over"
    assert result.verify_ok, verify.stdout + verify.stderr
    return result


def wait_log(path: Path, needle: str, timeout: float) -> None:
    wait_for(
        lambda: path.exists() and needle in path.read_text(errors="replace"), timeout, f"{needle!r} in {path.name}"
    )


def pids_alive(*procs: subprocess.Popen[Any]) -> bool:
    return all(p.poll() is None for p in procs)


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
