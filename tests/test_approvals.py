"""Two-person approval of campaign versions: submit, approve, the gate before real gateways, voids, the ledger.

Accounts are made and proven through the real `dispatch` command (passwords on standard
input); sends go to a real HTTP provider on 127.0.0.1; the store parts run on SQLite and
PostgreSQL; tampering is raw SQL on the events table, as in test_audit_ledger.py.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from dispatcher.clock import SettableClock
from dispatcher.scheduler import Scheduler
from tests.conftest import Project
from tests.twilio_support import LocalServer, json_reply

FAKE_NOW = "2021-02-15T10:00:00+08:00"
PASSWORD = "s3cret-pass-phrase"
SH = ZoneInfo("Asia/Shanghai")

CAMPAIGN = """\
id: approval-test
title: 冒充客服退款诈骗预警（审批测试）
owner: 公安分局
template: approval.sms.j2
audience:
  districts: [lucheng, dingyan]
"""
TEMPLATE = "请警惕冒充客服退款诈骗，核实请拨96110。"

GATEWAY = """\
url: {url}/send
body:
  format: json
  template:
    mobile: "{{to}}"
    content: "{{body}}"
response:
  message_id: msgid
  error_code: code
  success_codes: ["0"]
"""


class Provider:
    """A carrier's HTTP API that takes every message and counts them."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sent += 1
        return json_reply(200, {"code": 0, "msgid": f"m{self.sent}"})


def users_add(project: Project, name: str, role: str = "operator") -> None:
    result = project.dispatch("users", "add", name, "--role", role, input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr


def as_operator(project: Project, command: str, name: str, password: str = PASSWORD, **env: str) -> Any:
    return project.dispatch(command, "campaigns/approval-test.yaml", "--as", name, input=password + "\n", env=env)


def one_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def approvals(project: Project) -> dict[str, Any]:
    listed = project.dispatch("approvals", "--json")
    assert listed.returncode == 0, listed.stderr
    return {item["campaign_id"]: item for item in json.loads(listed.stdout)["approvals"]}


def audit_kinds(project: Project) -> list[str]:
    events = json.loads(project.dispatch("audit", "exports", "--json", "--limit", "500").stdout)["exports"]
    return [e["kind"] for e in reversed(events)]


def setup(project: Project, *, size: int = 20, users: bool = True) -> None:
    if size:
        project.registry(size, seed=5)
    project.write("templates/approval.sms.j2", TEMPLATE)
    project.write("campaigns/approval-test.yaml", CAMPAIGN)
    if users:
        users_add(project, "alice")
        users_add(project, "bob")


def test_author_cannot_approve_own_version_a_second_operator_can_and_audit_verify_covers_it(
    any_db_project: Project,
) -> None:
    project = any_db_project
    setup(project, size=5)
    users_add(project, "carol", role="auditor")
    assert approvals(project)["approval-test"]["state"] == "unapproved"

    submitted = as_operator(project, "submit", "alice")
    assert submitted.returncode == 0, submitted.stderr
    version = approvals(project)["approval-test"]["version"]
    assert version[:12] in submitted.stdout
    assert approvals(project)["approval-test"]["submitted_by"] == "alice"

    own = as_operator(project, "approve", "alice")
    assert own.returncode == 2
    line = one_line(own)
    assert "alice submitted version" in line and "cannot approve" in line and version[:12] in line

    wrong = as_operator(project, "approve", "bob", password="not-the-password")
    assert wrong.returncode == 2 and "wrong password" in one_line(wrong)
    auditor = as_operator(project, "approve", "carol")
    assert auditor.returncode == 2 and "only operators" in one_line(auditor)
    assert approvals(project)["approval-test"]["state"] == "submitted"

    approved = as_operator(project, "approve", "bob")
    assert approved.returncode == 0, approved.stderr
    item = approvals(project)["approval-test"]
    assert (item["state"], item["approved_by"], item["submitted_by"]) == ("approved", "bob", "alice")
    assert audit_kinds(project) == ["approval.submitted", "approval.refused", "approval.approved"]

    ok = project.dispatch("audit", "verify")
    assert ok.returncode == 0 and "ok audit: 3 events" in ok.stdout, ok.stdout + ok.stderr
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    try:
        with engine.begin() as conn:  # claim the author approved it: the refusal's actor rewritten
            conn.execute(sa.text("UPDATE events SET actor = 'operator:bob' WHERE kind = 'approval.refused'"))
    finally:
        engine.dispose()
    bad = project.dispatch("audit", "verify")
    assert bad.returncode == 1
    assert "chain audit" in bad.stderr and "edited" in bad.stderr, bad.stderr


def test_http_run_waits_for_approval_and_a_template_edit_voids_it(project: Project) -> None:
    provider = Provider()
    server = LocalServer(provider)
    try:
        setup(project)
        project.write("gateway.yaml", GATEWAY.format(url=server.url))
        project.env.update(
            {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": "gateway.yaml", "DISPATCH_FAKE_NOW": FAKE_NOW}
        )

        refused = project.dispatch("run", "campaigns/approval-test.yaml")
        assert refused.returncode == 2
        line = one_line(refused)
        version = approvals(project)["approval-test"]["version"]
        assert "approval-test" in line and version[:12] in line and "dispatch submit" in line, line
        assert "dispatch approve campaigns/approval-test.yaml --as NAME" in line
        assert provider.sent == 0 and project.runtime().store.list_runs() == []

        assert as_operator(project, "submit", "alice").returncode == 0
        half = project.dispatch("run", "campaigns/approval-test.yaml")
        assert half.returncode == 2 and "submitted by alice" in one_line(half) and provider.sent == 0
        assert as_operator(project, "approve", "bob").returncode == 0

        ran = project.dispatch("run", "campaigns/approval-test.yaml", "--json")
        assert ran.returncode == 0, ran.stderr
        assert provider.sent > 0
        (run,) = project.runtime().store.list_runs()
        assert (run.version_sha256, run.approved_by, run.approval_exempt) == (version, "bob", None)
        assert run.approved_at is not None

        sent = provider.sent
        project.write("templates/approval.sms.j2", TEMPLATE + "转账前请三思。")
        again = project.dispatch("run", "campaigns/approval-test.yaml", "--again", "--reason", "re-send after edit")
        assert again.returncode == 2
        line = one_line(again)
        assert "voided by edit" in line and version[:12] in line, line
        assert provider.sent == sent and len(project.runtime().store.list_runs()) == 1
        item = approvals(project)["approval-test"]
        assert item["state"] == "voided" and item["version"] != version and item["voided_version"] == version
        assert audit_kinds(project)[-1] == "approval.voided"
        assert project.dispatch("audit", "verify").returncode == 0
    finally:
        server.close()


def current_version(project: Project, relative: str) -> str:
    from dispatcher.approvals import campaign_version
    from dispatcher.campaigns import load_campaign

    return campaign_version(load_campaign(project.root / relative, project.root / "templates"))


def test_outbox_drill_is_exempt_says_why_and_its_approval_columns_are_sealed_in_the_ledger(project: Project) -> None:
    setup(project, size=10, users=False)
    drill = project.dispatch("run", "campaigns/approval-test.yaml", env={"DISPATCH_FAKE_NOW": FAKE_NOW})
    assert drill.returncode == 0, drill.stderr
    (run,) = project.runtime().store.list_runs()
    assert (run.approved_by, run.approval_exempt) == (None, "drill: outbox gateway")
    assert run.version_sha256 == current_version(project, "campaigns/approval-test.yaml")
    # the run row's approval is sealed in its ledger head: claiming an approver afterwards is caught
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE runs SET approved_by = 'bob', approval_exempt = NULL"))
    finally:
        engine.dispose()
    forged = project.dispatch("audit", "verify", run.id)
    assert forged.returncode == 1 and "does not match the run's approval" in forged.stderr, forged.stderr


def test_urgent_send_is_exempt_and_a_drill_resumed_through_a_real_gateway_is_refused(project: Project) -> None:
    provider = Provider()
    server = LocalServer(provider)
    try:
        setup(project, size=10, users=False)
        project.env["DISPATCH_FAKE_NOW"] = FAKE_NOW
        project.write("gateway.yaml", GATEWAY.format(url=server.url))
        urgent = CAMPAIGN.replace("id: approval-test", "id: urgent-approval-test") + (
            "priority: urgent\nreason: 已发现针对本辖区的冒充客服诈骗，须立即预警\n"
        )
        project.write("campaigns/urgent.yaml", urgent)
        env = {"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": "gateway.yaml"}
        sent = project.dispatch("run", "campaigns/urgent.yaml", env=env)
        assert sent.returncode == 0, sent.stderr
        assert provider.sent > 0
        (run,) = project.runtime().store.list_runs(campaign_id="urgent-approval-test")
        assert run.approved_by is None and run.approval_exempt == "urgent: 已发现针对本辖区的冒充客服诈骗，须立即预警"

        # a drill left pending (no send in the window yet), then resumed through the real gateway
        late = project.dispatch(
            "run", "campaigns/approval-test.yaml", env={"DISPATCH_FAKE_NOW": "2021-02-15T22:00:00+08:00"}
        )
        assert late.returncode == 1 and "outside the send window" in late.stderr, late.stderr  # left pending
        drill_id = late.stdout.strip()
        resumed = project.dispatch("resume", drill_id, env=env)
        assert resumed.returncode == 2 and "made as a drill" in one_line(resumed)
        assert provider.sent == len([r for r in project.runtime().store.deliveries(run.id) if r.provider_id])
    finally:
        server.close()


def _scheduler(project: Project, clock: SettableClock) -> tuple[Any, Scheduler]:
    rt = project.runtime(clock=clock)
    sched = Scheduler(rt, project.root / "campaigns", holder="test-scheduler")
    cwd = Path.cwd()
    os.chdir(project.root)
    try:
        sched.load(strict=True)
    finally:
        os.chdir(cwd)
    return rt, sched


def test_scheduler_skips_an_unapproved_fire_as_not_approved_and_fires_an_approved_one(
    any_db_project: Project,
) -> None:
    project = any_db_project
    project.registry(20, seed=6)
    project.write("templates/approval.sms.j2", TEMPLATE)
    for path in (project.root / "campaigns").glob("*.yaml"):
        path.unlink()
    schedule = "schedule:\n  cron: '0 10 * * *'\n  timezone: Asia/Shanghai\n  misfire_grace: 1h\n"
    project.write("campaigns/daily.yaml", CAMPAIGN.replace("id: approval-test", "id: daily-approval") + schedule)
    # a real gateway is configured; the scheduler never reaches it (no worker runs in this test)
    project.write("gateway.yaml", GATEWAY.format(url="http://127.0.0.1:9"))
    project.env.update({"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml")})

    clock = SettableClock(datetime(2022, 3, 1, 10, 0, 10, tzinfo=SH))
    rt, sched = _scheduler(project, clock)
    assert sched.tick() == 0
    (fire,) = rt.store.coordination.list_fires("daily-approval")
    assert fire.status == "skipped" and fire.reason.startswith("not_approved: campaign daily-approval: version ")
    assert "dispatch submit" in fire.reason
    assert rt.store.list_runs() == []

    from tests.conftest import approve_campaign

    version = approve_campaign(rt, project.root / "campaigns/daily.yaml")
    clock.set(datetime(2022, 3, 2, 10, 0, 10, tzinfo=SH))
    assert sched.tick() == 1
    (run,) = rt.store.list_runs()
    assert (run.version_sha256, run.approved_by) == (version, "approval-second")
    statuses = sorted(f.status for f in rt.store.coordination.list_fires("daily-approval"))
    assert statuses == ["fired", "skipped"]


def test_dashboard_lists_pending_approvals_and_a_second_operator_approves_with_the_csrf_form(
    project: Project, tmp_path: Path
) -> None:
    import re

    import httpx

    from tests.conftest import serve_web
    from tests.test_dashboard_browser import login

    setup(project, size=0)  # approving needs no residents
    users_add(project, "carol", role="auditor")
    submitted = as_operator(project, "submit", "alice")
    assert submitted.returncode == 0, submitted.stderr
    version = re.search(r"version ([0-9a-f]{12}) submitted", submitted.stdout).group(1)  # type: ignore[union-attr]

    def form_of(client: httpx.Client, base: str) -> tuple[str, str]:
        page = client.get(base + "/dashboard/approvals", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "approval-test" in page.text and version[:12] in page.text
        token = re.search(r'action="/dashboard/approvals"><input type="hidden" name="csrf" value="([^"]+)"', page.text)
        return page.text, token.group(1) if token else ""

    with serve_web(project, tmp_path / "web.log") as (base, _proc):
        clients = {name: httpx.Client(timeout=30) for name in ("alice", "bob", "carol")}
        for name, client in clients.items():
            assert login(base, name, PASSWORD, client).status_code == 303
        alice_page, alice_token = form_of(clients["alice"], base)
        assert "yours: a second operator approves it" in alice_page and not alice_token
        carol_page, carol_token = form_of(clients["carol"], base)
        assert "submitted by alice" in carol_page and not carol_token
        data = {"campaign": "approval-test", "version": version}
        # an auditor cannot approve, and neither can a page on another site
        carol_csrf = clients["carol"].cookies.get("dispatch_csrf") or ""
        refused = clients["carol"].post(base + "/dashboard/approvals", data={**data, "csrf": carol_csrf})
        assert refused.status_code == 403
        _bob_page, bob_token = form_of(clients["bob"], base)
        assert bob_token
        evil = clients["bob"].post(
            base + "/dashboard/approvals", data={**data, "csrf": bob_token}, headers={"Origin": "https://evil.example"}
        )
        assert evil.status_code == 403
        ok = clients["bob"].post(
            base + "/dashboard/approvals", data={**data, "csrf": bob_token}, headers={"Origin": base}
        )
        assert ok.status_code == 303, ok.text
        for client in clients.values():
            client.close()
    item = approvals(project)["approval-test"]
    assert (item["state"], item["approved_by"], item["submitted_by"]) == ("approved", "bob", "alice")


def test_a_drill_run_reaching_a_worker_with_a_real_gateway_is_halted_until_approved_and_resumed(
    project: Project,
) -> None:
    from dispatcher.campaigns import load_campaign
    from dispatcher.runs import resume_run, start_run
    from dispatcher.sender import process_batch
    from tests.conftest import approve_campaign
    from tests.twilio_support import Clock

    provider = Provider()
    server = LocalServer(provider)
    try:
        setup(project, size=10, users=False)
        path = project.root / "campaigns/approval-test.yaml"
        clock = Clock()
        drill_rt = project.runtime(clock=clock)  # the operator's shell: the outbox
        created = start_run(drill_rt, load_campaign(path, drill_rt.settings.templates_dir))
        assert drill_rt.store.get_run(created.run_id).approval_exempt == "drill: outbox gateway"

        project.write("gateway.yaml", GATEWAY.format(url=server.url))
        project.env.update({"DISPATCH_GATEWAY": "http", "DISPATCH_HTTP_CONFIG": str(project.root / "gateway.yaml")})
        worker_rt = project.runtime(clock=clock)  # a worker configured with a carrier's HTTP API
        process_batch(worker_rt, created.run_id, 0)
        run = worker_rt.store.get_run(created.run_id)
        assert provider.sent == 0 and run.status == "paused" and "made as a drill" in (run.halted or "")

        approve_campaign(worker_rt, path)
        resume_run(worker_rt, created.run_id)
        process_batch(worker_rt, created.run_id, 0)
        assert provider.sent > 0 and worker_rt.store.get_run(created.run_id).halted is None
    finally:
        server.close()
