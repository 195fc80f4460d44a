"""The auditors' dashboard in a real headless Chromium, served by the real `dispatch web` process.

One run over three districts (in 2021Q1, by the fake clock), two accounts made with
`dispatch users add` (an auditor and an operator), then: an anonymous client is
refused, the auditor logs in, opens the coverage heat map (screenshot saved to
test-artifacts/heatmap.png and listed by the terminal summary), searches the ledger
and sees only masked numbers, and may not search by phone number; the operator
searches by number and unmasks, and both land in the audit chain.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Project, _make_project, missing_service, serve_web
from tests.test_audit_ledger import run_campaign

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"
AUDITOR_PW = "correct horse battery"
OPERATOR_PW = "staple operator 2021"


def add_user(project: Project, name: str, role: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "users", "add", name, "--role", role],
        cwd=project.root, env=project.env, input=password + "\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def login(base: str, name: str, password: str, client: httpx.Client | None = None) -> httpx.Response:
    """Log in as a browser does: fetch the form (its CSRF cookie and field), then post it."""
    client = client or httpx.Client()
    form = client.get(base + "/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token, form.text
    return client.post(
        base + "/login", data={"name": name, "password": password, "csrf": token.group(1)}, follow_redirects=False
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A project with a finished run and two accounts, and `dispatch web` serving it (shared by the module:
    the tests only read, except the audit chain, which only the last test asserts on)."""
    root = tmp_path_factory.mktemp("dashboard")
    project = _make_project(root / "project", f"sqlite:///{root / 'project' / 'var' / 'dispatch.db'}")
    run_id = run_campaign(project, size=400)
    assert add_user(project, "alice", "auditor", AUDITOR_PW).returncode == 0
    assert add_user(project, "bob", "operator", OPERATOR_PW).returncode == 0
    with serve_web(project, root / "web.log") as (base, _proc):
        yield {"base": base, "run_id": run_id, "project": project}


def test_anonymous_requests_get_no_dashboard_data(served: dict[str, Any]) -> None:
    base = served["base"]
    for path in (
        "/dashboard",
        "/dashboard/coverage?period=2021Q1",
        "/dashboard/ledger?state=sent",
        "/dashboard/rates",
    ):
        api = httpx.get(base + path, follow_redirects=False)
        assert api.status_code == 401, path
        assert served["run_id"] not in api.text and "+86" not in api.text
        browser_like = httpx.get(base + path, headers={"Accept": "text/html"}, follow_redirects=False)
        assert browser_like.status_code == 303 and browser_like.headers["location"].startswith("/login?next=")
    forged = httpx.get(base + "/dashboard", cookies={"dispatch_session": "eyJ1IjoiYWxpY2UifQ==.deadbeef"})
    assert forged.status_code == 401


def test_wrong_password_is_refused_and_no_default_account_exists(served: dict[str, Any]) -> None:
    base = served["base"]
    for name, pw in (("alice", "wrong password!"), ("admin", "admin"), ("admin", "")):
        r = login(base, name, pw)
        assert r.status_code == 401 and "dispatch_session" not in r.headers.get("set-cookie", "")


def test_auditor_logs_in_sees_heat_map_and_masked_ledger_operator_unmasks(served: dict[str, Any]) -> None:
    if not Path(CHROMIUM).exists():
        missing_service(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("playwright is not installed (pip install -e '.[dev]')")
    base, project = served["base"], served["project"]
    sent = json.loads(
        project.dispatch(
            "audit",
            "log",
            "--format",
            "jsonl",
            "--state",
            "sent",
            "--district",
            "lucheng",
            "--limit",
            "1",
            "--unmask",
        ).stdout
    )
    phone = sent["phone"]
    assert "*" not in phone

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "heatmap.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            # anonymous: the dashboard sends the browser to the login form
            page.goto(base + "/dashboard/coverage?period=2021Q1")
            assert page.url.startswith(base + "/login")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", "not the password")
            page.click("button[type=submit]")
            assert page.locator("[role=alert]").inner_text() == "Wrong account name or password."
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", AUDITOR_PW)
            page.click("button[type=submit]")

            # back where it was going: the heat map of 2021Q1
            page.wait_for_selector("#heatmap")
            assert "/dashboard/coverage" in page.url
            lucheng = float(
                page.get_attribute("#heatmap td[data-district=lucheng][data-segment=retirees]", "data-percent") or -1
            )
            henglin = float(
                page.get_attribute("#heatmap td[data-district=henglin][data-segment=retirees]", "data-percent") or -1
            )
            assert lucheng > 90.0 and henglin == 0.0
            page.locator("#heatmap").screenshot(path=str(shot))
            assert shot.stat().st_size > 5000

            page.click("text=Runs")
            assert served["run_id"] in page.locator("#runs").inner_text()
            page.click("text=Delivery rates")
            assert page.locator("#rates rect").count() >= 1

            # an auditor's ledger search: masked numbers, no unmask and no search by number offered
            page.click("text=Ledger")
            assert page.locator("input[name=unmask]").count() == 0
            assert page.locator("#ledger-search input[name=phone]").count() == 0
            page.fill("#ledger-search input[name=district]", "lucheng")
            page.fill("#ledger-search input[name=state]", "sent")
            page.click("#ledger-search button")
            page.wait_for_selector("#ledger")
            text = page.locator("#ledger").inner_text()
            assert phone not in text
            assert "*" * (len(phone) - 4) + phone[-4:] in text and "sent" in text
            page.goto(base + f"/dashboard/ledger?phone={phone.replace('+', '%2B')}&unmask=1")
            assert page.locator("#ledger").count() == 0 and "Only operators may search by phone" in page.content()

            # an operator may search by number and unmask; both are recorded in the audit chain
            op = browser.new_context().new_page()
            op.goto(base + "/login")
            op.fill("input[name=name]", "bob")
            op.fill("input[name=password]", OPERATOR_PW)
            op.click("button[type=submit]")
            op.click("text=Ledger")
            op.fill("#ledger-search input[name=phone]", phone)
            op.click("#ledger-search button")
            op.wait_for_selector("#ledger")
            assert phone not in op.locator("#ledger").inner_text() and phone[-4:] in op.locator("#ledger").inner_text()
            op.check("input[name=unmask]")
            op.click("#ledger-search button")
            op.wait_for_selector("#ledger")
            assert phone in op.locator("#ledger").inner_text()
        finally:
            browser.close()
    print(f"\nheat map screenshot: {shot}")
    exports = json.loads(project.dispatch("audit", "exports", "--json").stdout)["exports"]
    assert [(e["actor"], e["kind"]) for e in exports][:2] == [("web:bob", "audit.export"), ("web:bob", "audit.search")]
    assert exports[0]["payload"]["via"] == "dashboard"
    assert project.dispatch("audit", "verify").returncode == 0


def test_repeated_failed_logins_lock_that_account_name_for_a_while(served: dict[str, Any]) -> None:
    base, project = served["base"], served["project"]
    assert add_user(project, "erin", "auditor", "erin's long password").returncode == 0
    for _ in range(5):
        r = login(base, "erin", "guess")
        assert r.status_code == 401
    # even the right password is refused now, and nothing is issued
    locked = login(base, "erin", "erin's long password")
    assert locked.status_code == 429 and "dispatch_session" not in locked.headers.get("set-cookie", "")
    # other accounts are not affected
    ok = login(base, "alice", AUDITOR_PW)
    assert ok.status_code == 303 and "dispatch_session=" in ok.headers["set-cookie"]


def test_users_add_reads_the_password_from_stdin_stores_only_a_hash_and_refuses_bad_input(
    project: Project,
) -> None:
    ok = add_user(project, "carol", "auditor", "a long enough secret")
    assert ok.returncode == 0, ok.stderr
    for args, password, needle in (
        (("dave", "auditor"), "short", "password too short"),
        (("dave", "admin"), "a long enough secret", "unknown role"),
        (("carol", "operator"), "another long secret", "exists already"),
        (("bad name!", "auditor"), "a long enough secret", "account name"),
    ):
        bad = add_user(project, *args, password)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    import sqlalchemy as sa

    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT role, password_hash FROM accounts WHERE name = 'carol'")).one()
    assert stored.role == "auditor"
    assert stored.password_hash.startswith("scrypt$") and "a long enough secret" not in stored.password_hash
    listed = json.loads(project.dispatch("users", "list", "--json").stdout)
    assert listed == {"users": [{"name": "carol", "role": "auditor", "disabled": False}]}


def test_session_cookies_are_refused_when_forged_expired_or_ended(tmp_path: Path) -> None:
    from dispatcher.accounts import Account, add_user
    from dispatcher.store import open_store
    from dispatcher.web.dashboard import Sessions

    store = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    add_user(store, "alice", "auditor", "a long enough secret")
    sessions = Sessions(store, "s" * 32, max_age=60)
    cookie = sessions.issue(Account("alice", "auditor"))
    assert sessions.read(cookie) == Account("alice", "auditor")
    assert Sessions(store, "o" * 32, 60).read(cookie) is None
    session_id, sig = cookie.rsplit(".", 1)
    tampered = ("A" if session_id[0] != "A" else "B") + session_id[1:]
    assert sessions.read(tampered + "." + sig) is None
    assert sessions.read("é" + cookie) is None  # not ASCII: refused, not a crash
    expired = Sessions(store, "s" * 32, max_age=-1)
    assert expired.read(expired.issue(Account("alice", "auditor"))) is None
    sessions.end(cookie)
    assert sessions.read(cookie) is None
    store.close()
