"""Delivery reports chased to the end: rows `sent` whose report never came are asked about, then unconfirmed.

Real parts throughout: runs through the outbox (which answers from its own file), the real
``twilio`` client against Prism (Twilio's schema) and against a stateful local peer, the HTTP
adapter against a local server, the scheduler's leader, and `dispatch reconcile` as a
subprocess. The business clock is injected, never patched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prism_support import ACCOUNT_SID, AUTH_TOKEN, FROM, PrismServer, prism_server  # noqa: F401
from twilio_support import Clock, LocalServer, campaign_yaml, drive, json_reply, start

from dispatcher.audit import verify
from dispatcher.dlr import chase_run
from dispatcher.errors import ConfigError
from dispatcher.providers.http.gateway import HttpConfigError, HttpGateway, load_config
from dispatcher.providers.httptrace import collecting
from dispatcher.providers.twilio.gateway import TwilioGateway
from dispatcher.reports import coverage, quarter_of
from dispatcher.reports import parse_period as period_of
from dispatcher.runtime import Runtime
from dispatcher.scheduler import Scheduler
from dispatcher.settings import Settings
from dispatcher.store import schema
from tests.conftest import Project

HOUR = 3600.0
PUBLIC_URL = "https://dispatch.example.org"
SID_PATH = re.compile(r"/Messages/((?:SM|MM)[0-9a-fA-F]{32})\.json$")


def run_through(rt: Runtime, project: Project, clock: Clock, name: str = "dlr") -> str:
    path = project.write(f"campaigns/{name}.yaml", campaign_yaml(name))
    run_id = start(rt, path)
    drive(rt, run_id, clock)
    return run_id


def sent_rows(rt: Runtime, run_id: str) -> list[dict[str, Any]]:
    return [r for r in rt.store.deliveries(run_id) if r.state == "sent"]


def states(rt: Runtime, run_id: str) -> dict[str, str]:
    return {r.phone: r.state for r in rt.store.deliveries(run_id)}


def ledger_events(rt: Runtime, run_id: str, to_state: str) -> list[Any]:
    e = schema.events
    with rt.store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(e.c.from_state, e.c.reason, e.c.actor).where(e.c.run_id == run_id, e.c.to_state == to_state)
            )
        )


def verified(rt: Runtime, run_id: str) -> bool:
    return all(result.problem is None for result in verify(rt.store, run_id))


def outbox_runtime(project: Project, clock: Clock, *, undelivered: list[str], silent: list[str], **env: str) -> Runtime:
    """A runtime whose outbox says these numbers' messages were undelivered / never says what became of them."""
    project.env["DISPATCH_OUTBOX_UNDELIVERED"] = ",".join(undelivered)
    project.env["DISPATCH_OUTBOX_NO_REPORT"] = ",".join(silent)
    project.env.update(env)
    return project.runtime(clock=clock)


def one_undelivered_two_unconfirmed(project: Project) -> tuple[Runtime, str, list[Any]]:
    """A run through the outbox, chased past a 1 h deadline: one row undelivered, two unconfirmed, the rest
    delivered. Returns the chasing runtime, the run id and the rows as they were sent."""
    clock = Clock()
    run_id = run_through(project.runtime(clock=clock), project, clock)
    rows = sent_rows(project.runtime(clock=clock), run_id)
    rt = outbox_runtime(
        project,
        clock,
        undelivered=[rows[0].phone],
        silent=[r.phone for r in rows[1:3]],
        DISPATCH_DLR_DEADLINE="1h",
    )
    clock.advance(2 * HOUR)
    chase_run(rt, run_id)
    return rt, run_id, rows


# ------------------------------------------------------------------ the sweep, through the outbox


def test_outbox_rows_are_chased_then_the_silent_ones_become_unconfirmed_and_the_ledger_still_verifies(
    any_db_project: Project,
) -> None:
    project = any_db_project
    project.registry(size=40, seed=11)
    clock = Clock()
    run_id = run_through(project.runtime(clock=clock), project, clock)
    rt = outbox_runtime(project, clock, undelivered=[], silent=[])
    rows = sent_rows(rt, run_id)
    assert len(rows) >= 10
    undelivered, silent = [r.phone for r in rows[:2]], [r.phone for r in rows[2:5]]
    rt = outbox_runtime(project, clock, undelivered=undelivered, silent=silent)

    clock.advance(10 * 60)  # younger than DISPATCH_DLR_CHASE_AFTER (30 min): nobody is asked yet
    early = chase_run(rt, run_id)
    assert (early.asked, early.unconfirmed) == (0, 0)
    assert set(states(rt, run_id).values()) <= {"sent", "skipped"}

    clock.advance(25 * 60)
    chased = chase_run(rt, run_id)
    assert chased.asked == chased.answered == len(rows)
    assert (chased.delivered, chased.undelivered, chased.no_final_status) == (len(rows) - 5, 2, 3)
    assert chased.unconfirmed == 0  # the deadline (72 h) is far off
    now = states(rt, run_id)
    assert {now[p] for p in undelivered} == {"undelivered"} and {now[p] for p in silent} == {"sent"}
    undelivered_row = next(r for r in rt.store.deliveries(run_id) if r.phone == undelivered[0])
    assert undelivered_row.error_code == "outbox.undelivered"
    assert {e.actor for e in ledger_events(rt, run_id, "delivered")} == {"dlr:outbox"}

    clock.advance(72 * HOUR)
    final = chase_run(rt, run_id)
    assert (final.asked, final.no_final_status, final.unconfirmed) == (3, 3, 3)
    assert final.now == {"sent": 0, "delivered": len(rows) - 5, "undelivered": 2, "unconfirmed": 3}
    marked = ledger_events(rt, run_id, "unconfirmed")
    assert len(marked) == 3
    assert {(e.from_state, e.reason) for e in marked} == {
        ("sent", "no final delivery report within 72h of the hand-over")
    }
    assert verified(rt, run_id)

    # nothing left to ask; a sweep again changes nothing
    again = chase_run(rt, run_id)
    assert (again.asked, again.unconfirmed) == (0, 0)

    # a real report that arrives late still counts; a late "sent" does not move a row back
    late = next(r for r in rt.store.deliveries(run_id) if r.phone == silent[0])
    assert rt.store.provider_events.apply_status(late.provider_id, "sent", actor="provider") == []
    moved = rt.store.provider_events.apply_status(late.provider_id, "delivered", actor="provider")
    assert [(c.from_state, c.to_state) for c in moved] == [("unconfirmed", "delivered")]
    other = next(r for r in rt.store.deliveries(run_id) if r.phone == silent[1])
    moved = rt.store.provider_events.apply_status(
        other.provider_id, "undelivered", error_code="late.30003", actor="provider"
    )
    assert [(c.from_state, c.to_state) for c in moved] == [("unconfirmed", "undelivered")]
    assert verified(rt, run_id)


def test_status_and_coverage_tell_delivered_undelivered_and_unconfirmed_apart(project: Project) -> None:
    project.registry(size=30, seed=12)
    rt, run_id, rows = one_undelivered_two_unconfirmed(project)

    from dispatcher.runs import status

    st = status(rt, run_id)
    assert st.delivery_reports == {
        "delivered": len(rows) - 3, "undelivered": 1, "unconfirmed": 2, "awaiting": 0,
    }  # fmt: skip
    assert st.parts_sent > 0 and st.open == 0
    report = coverage(rt.store, period_of(quarter_of(rt.clock())))
    totals = {k: sum(d[k] for d in report["districts"]) for k in ("reached", "delivered", "undelivered", "unconfirmed")}
    # an unconfirmed message was still handed over: reached, and counted apart from delivered
    assert totals == {"reached": len(rows) - 1, "delivered": len(rows) - 3, "undelivered": 1, "unconfirmed": 2}
    assert sum(c["unconfirmed"] for c in report["cells"]) >= 2


def test_dispatch_reconcile_prints_the_figures_and_status_shows_them(project: Project) -> None:
    project.registry(size=30, seed=13)
    clock = Clock()
    rt = project.runtime(clock=clock)
    run_id = run_through(rt, project, clock)
    rows = sent_rows(rt, run_id)
    env = {
        "DISPATCH_FAKE_NOW": (clock() + timedelta(hours=3)).isoformat(),
        "DISPATCH_DLR_DEADLINE": "2h",
        "DISPATCH_OUTBOX_UNDELIVERED": rows[0].phone,
        "DISPATCH_OUTBOX_NO_REPORT": f"{rows[1].phone},{rows[2].phone}",
    }
    done = project.dispatch("reconcile", run_id, env=env)
    assert done.returncode == 0, done.stderr
    n = len(rows)
    assert (
        f"asked outbox about {n} rows sent over 30m ago: {n - 3} delivered, 1 undelivered, 0 failed, "
        "2 with no final status yet, 0 unknown to it" in done.stdout
    )
    assert f"2 marked unconfirmed (no final report within 2h); now {n - 3} delivered, 1 undelivered, " in done.stdout
    assert "2 unconfirmed, 0 sent awaiting a report" in done.stdout
    assert "+86" not in done.stdout + done.stderr

    again = project.dispatch("reconcile", run_id, "--json", env=env)
    assert again.returncode == 0, again.stderr
    figures = json.loads(again.stdout)
    assert (figures["asked"], figures["unconfirmed"]) == (0, 0)
    assert figures["now"] == {"sent": 0, "delivered": n - 3, "undelivered": 1, "unconfirmed": 2}

    st = project.dispatch("status", run_id)
    assert st.returncode == 0, st.stderr
    assert "unconfirmed" in st.stdout
    assert f"delivery reports: {n - 3} delivered, 1 undelivered, 2 unconfirmed" in st.stdout
    audit = project.dispatch("audit", "verify", run_id)
    assert audit.returncode == 0, audit.stdout + audit.stderr

    unknown = project.dispatch("reconcile", "20200101-000000-ffffff", env=env)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_the_scheduler_leader_chases_reports_each_row_at_most_once_per_interval(project: Project) -> None:
    project.registry(size=25, seed=14)
    clock = Clock()
    run_id = run_through(project.runtime(clock=clock), project, clock)
    rows = sent_rows(project.runtime(clock=clock), run_id)
    rt = outbox_runtime(project, clock, undelivered=[], silent=[rows[0].phone], DISPATCH_DLR_DEADLINE="5h")
    scheduler = Scheduler(rt, project.root / "campaigns", holder="leader-a")

    scheduler.tick()
    assert set(states(rt, run_id).values()) <= {"sent", "skipped"}  # nothing is 30 minutes old yet

    clock.advance(HOUR)
    scheduler.reports_sweep._due_at = 0.0  # the sweep's own pacing (real seconds) is not under test here
    scheduler.tick()
    assert scheduler.is_leader
    after = states(rt, run_id)
    assert after[rows[0].phone] == "sent"
    assert {after[r.phone] for r in rows[1:]} == {"delivered"}
    # the silent row was asked a moment ago: the next pass leaves it alone
    second = scheduler.reports_sweep.tick(force=True)
    assert second[run_id].asked == 0

    clock.advance(5 * HOUR)
    scheduler.reports_sweep.tick(force=True)
    assert states(rt, run_id)[rows[0].phone] == "unconfirmed"
    assert {e.actor for e in ledger_events(rt, run_id, "unconfirmed")} == {"scheduler"}
    assert verified(rt, run_id)


def test_a_gateway_that_cannot_be_asked_only_waits_for_the_deadline(project: Project) -> None:
    """A gateway that declares no status fetch (Kannel; HTTP without a status URL) is never asked;
    its rows are unconfirmed at the deadline."""
    project.registry(size=10, seed=15)
    clock = Clock()
    run_id = run_through(project.runtime(clock=clock), project, clock)
    n = len(sent_rows(project.runtime(clock=clock), run_id))

    class Uncapable:
        name = "outbox"
        can_lookup = False
        can_fetch_status = False
        batch_capacity = 1

        def fetch_status(self, provider_ids: Any) -> Any:
            raise AssertionError("a gateway that declares no status fetch is never asked")

        def close(self) -> None:
            return None

    rt = project.runtime(clock=clock, gateway_factory=lambda s: Uncapable())  # type: ignore[arg-type,return-value]
    clock.advance(73 * HOUR)
    result = chase_run(rt, run_id)
    assert not result.can_fetch_status and result.asked == 0
    assert result.unconfirmed == n


def test_rows_are_not_given_up_before_the_provider_was_asked_about_every_one(project: Project) -> None:
    """The leader asks a bounded number per pass: a run it has not finished asking keeps its rows `sent`."""
    project.registry(size=30, seed=19)
    clock = Clock()
    run_id = run_through(project.runtime(clock=clock), project, clock)
    rows = sent_rows(project.runtime(clock=clock), run_id)
    rt = outbox_runtime(project, clock, undelivered=[], silent=[r.phone for r in rows])
    clock.advance(73 * HOUR)
    partial = chase_run(rt, run_id, budget=5)
    assert (partial.asked, partial.unconfirmed) == (5, 0)
    assert {r.state for r in rt.store.deliveries(run_id) if r.phone in {x.phone for x in rows}} == {"sent"}
    whole = chase_run(rt, run_id)
    assert (whole.asked, whole.unconfirmed) == (len(rows), len(rows))


def test_ringback_enrolments_are_never_chased_nor_unconfirmed(project: Project) -> None:
    """An enrolment's `sent` is final (ringback platforms send no delivery reports)."""
    from tests.test_ringback import ringback_yaml

    project.registry(size=10, seed=20)
    clock = Clock()
    rt = project.runtime(clock=clock)
    enrol_run = start(rt, project.write("campaigns/rb-dlr.yaml", ringback_yaml("rb-dlr", clock)))
    drive(rt, enrol_run, clock)
    assert sent_rows(rt, enrol_run)
    clock.advance(73 * HOUR)
    result = chase_run(rt, enrol_run)
    assert (result.asked, result.unconfirmed) == (0, 0)
    assert enrol_run not in rt.store.provider_events.runs_awaiting_reports(clock())
    assert "unconfirmed" not in set(states(rt, enrol_run).values())


def test_a_version_4_delivery_log_gets_the_index_reports_find_their_rows_by(database_url: str) -> None:
    """Every report (callback or sweep answer) looks its row up by provider id: without the index, each
    one read the whole deliveries table."""
    from dispatcher.store import open_store
    from dispatcher.store import schema as t

    store = open_store(database_url)
    with store.engine.begin() as conn:  # what a version 4 program left
        conn.execute(sa.text("DROP INDEX ix_deliveries_provider_id"))
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '4' WHERE key = 'schema_version'"))
    store.close()
    upgraded = open_store(database_url)
    assert upgraded.schema_version() == t.SCHEMA_VERSION
    with upgraded.engine.connect() as conn:
        indexes = {i["name"]: i for i in sa.inspect(conn).get_indexes("deliveries")}
    assert indexes["ix_deliveries_provider_id"]["column_names"] == ["provider_id"]
    upgraded.close()


# ------------------------------------------------------------------ settings


def test_dlr_settings_take_seconds_or_durations_and_refuse_a_deadline_before_the_chase() -> None:
    s = Settings.from_env({"DISPATCH_DLR_CHASE_AFTER": "15m", "DISPATCH_DLR_DEADLINE": "48h"})
    assert (s.dlr_chase_after, s.dlr_deadline) == (900.0, 48 * HOUR)
    d = Settings.from_env({})
    assert (d.dlr_chase_after, d.dlr_deadline) == (1800.0, 72 * HOUR)
    with pytest.raises(ConfigError, match="DISPATCH_DLR_DEADLINE"):
        Settings.from_env({"DISPATCH_DLR_CHASE_AFTER": "2h", "DISPATCH_DLR_DEADLINE": "1h"})
    with pytest.raises(ConfigError, match="DISPATCH_DLR_CHASE_AFTER: expected seconds or a duration"):
        Settings.from_env({"DISPATCH_DLR_CHASE_AFTER": "soon"})


# ------------------------------------------------------------------ Twilio


def twilio(base_url: str, extra_headers: Any = None) -> TwilioGateway:
    return TwilioGateway(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_=FROM,
        public_url=PUBLIC_URL,
        base_url=base_url,
        extra_headers=extra_headers,
    )


class StatefulTwilio:
    """A Twilio-shaped peer that remembers messages and answers a fetch by SID with the planned status."""

    def __init__(self) -> None:
        self.messages: dict[str, dict[str, Any]] = {}
        self.final: dict[str, tuple[str, int | None]] = {}
        self.fetches = 0
        self.down = False

    def __call__(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        from urllib.parse import parse_qs

        if method == "POST":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            sid = f"SM{len(self.messages) + 1:032x}"
            self.messages[sid] = {"sid": sid, "to": form["To"], "body": form["Body"], "status": "queued",
                                  "direction": "outbound-api", "error_code": None}  # fmt: skip
            return json_reply(201, self.messages[sid])
        match = SID_PATH.search(path)
        if method == "GET" and match:
            self.fetches += 1
            if self.down:
                return json_reply(503, {"code": 20503, "message": "Service Unavailable", "status": 503})
            message = self.messages.get(match.group(1))
            if message is None:
                return json_reply(404, {"code": 20404, "message": "not found", "status": 404})
            status, code = self.final.get(message["to"], ("sent", None))
            return json_reply(200, {**message, "status": status, "error_code": code})
        return json_reply(404, {"code": 20404, "message": "not found", "status": 404})


def test_twilio_messages_are_fetched_by_sid_and_their_final_status_recorded(project: Project) -> None:
    project.registry(size=12, seed=16)
    clock = Clock()
    peer = StatefulTwilio()
    server = LocalServer(peer)
    try:
        rt = project.runtime(clock=clock, gateway_factory=lambda s: twilio(server.url))
        run_id = run_through(rt, project, clock, name="dlr-twilio")
        rows = sent_rows(rt, run_id)
        assert len(rows) >= 5 and all(r.provider_id.startswith("SM") for r in rows)
        peer.final[rows[0].phone] = ("undelivered", 30003)
        peer.final[rows[1].phone] = ("failed", 30008)
        for r in rows[3:]:
            peer.final[r.phone] = ("delivered", None)
        # rows[2]: Twilio still says "sent" (no final status)

        peer.down = True
        clock.advance(HOUR)
        down = chase_run(rt, run_id)
        assert down.error is not None and down.error.startswith("twilio.")
        assert down.delivered == 0 and set(states(rt, run_id).values()) <= {"sent", "skipped"}

        peer.down = False
        result = chase_run(rt, run_id)
        assert result.error is None and result.asked == len(rows)
        assert (result.delivered, result.undelivered, result.failed, result.no_final_status) == (len(rows) - 3, 1, 1, 1)
        by_phone = {r.phone: r for r in rt.store.deliveries(run_id)}
        assert (by_phone[rows[0].phone].state, by_phone[rows[0].phone].error_code) == (
            "undelivered", "twilio.30003",
        )  # fmt: skip
        assert by_phone[rows[1].phone].state == "failed"
        assert by_phone[rows[2].phone].state == "sent"

        clock.advance(72 * HOUR)
        final = chase_run(rt, run_id)
        assert final.unconfirmed == 1 and by_phone[rows[2].phone].id in {
            r.id for r in rt.store.deliveries(run_id) if r.state == "unconfirmed"
        }
        assert verified(rt, run_id)
    finally:
        server.close()


def test_twilio_sid_unknown_to_twilio_is_left_out() -> None:
    peer = StatefulTwilio()
    server = LocalServer(peer)
    try:
        gateway = twilio(server.url)
        assert gateway.can_fetch_status
        assert gateway.fetch_status(["SM" + "ab" * 16]) == {}
        gateway.close()
    finally:
        server.close()


@pytest.mark.slow
def test_twilio_status_fetch_passes_twilio_schema_through_prism(project: Project, prism: PrismServer) -> None:
    """Prism answers a fetch with Twilio's example (status "sent"): asked, nothing final, unconfirmed later."""
    project.registry(size=8, seed=17)
    clock = Clock()

    def prefer(method: str, url: str, data: Mapping[str, Any] | None) -> dict[str, str]:
        # every created message gets its own SID; a fetch answers with Twilio's own example
        return {"Prefer": "dynamic=true"} if method.upper() == "POST" else {"Prefer": "code=200, example=fetch"}

    rt = project.runtime(clock=clock, gateway_factory=lambda s: twilio(prism.url, prefer))
    run_id = run_through(rt, project, clock, name="dlr-prism")
    rows = sent_rows(rt, run_id)
    assert rows

    with collecting() as trace:
        answers = rt.gateway.fetch_status([rows[0].provider_id])
    assert [(t["method"], t["status"]) for t in trace] == [("GET", 200)]
    assert trace[0]["url"].endswith(f"/Messages/{rows[0].provider_id}.json")
    assert answers[rows[0].provider_id].status == "sent"
    assert answers[rows[0].provider_id].error_code == "twilio.30007"

    clock.advance(HOUR)
    asked = chase_run(rt, run_id)
    assert (asked.asked, asked.answered, asked.no_final_status, asked.unconfirmed) == (len(rows),) * 3 + (0,)
    clock.advance(72 * HOUR)
    final = chase_run(rt, run_id)
    assert final.unconfirmed == len(rows)
    assert prism.violations() == []
    assert verified(rt, run_id)


# ------------------------------------------------------------------ the HTTP adapter

SEND_WITH_STATUS = """\
url: {base}/send
body:
  format: json
  template:
    mobile: "{{to}}"
    content: "{{body}}"
response:
  message_id: msgid
status:
  url: {base}/report?id={{provider_id}}
  status: data.state
  error_code: data.err
  states: {{DELIVRD: delivered, UNDELIV: undelivered}}
"""


def test_http_adapter_fetches_status_only_when_its_config_declares_a_status_url(tmp_path: Path) -> None:
    reports = {"m-1": {"state": "DELIVRD"}, "m-2": {"state": "UNDELIV", "err": "E42"}, "m-3": {"state": "ENROUTE"}}

    def handler(method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/report?id="):
            item = reports.get(path.split("=", 1)[1])
            return json_reply(200, {"data": item}) if item else json_reply(404, {"error": "no such message"})
        return json_reply(200, {"msgid": "m-1"})

    server = LocalServer(handler)
    try:
        with_status = tmp_path / "carrier.yaml"
        with_status.write_text(SEND_WITH_STATUS.format(base=server.url), encoding="utf-8")
        gateway = HttpGateway(load_config(with_status, env={}))
        assert gateway.can_fetch_status
        answers = gateway.fetch_status(["m-1", "m-2", "m-3", "m-9"])
        assert {k: (v.status, v.error_code) for k, v in answers.items()} == {
            "m-1": ("delivered", None), "m-2": ("undelivered", "http.E42"), "m-3": ("ENROUTE", None),
        }  # fmt: skip
        gateway.close()

        without = tmp_path / "plain.yaml"
        without.write_text(SEND_WITH_STATUS.format(base=server.url).split("status:")[0], encoding="utf-8")
        plain = HttpGateway(load_config(without, env={}))
        assert not plain.can_fetch_status
        plain.close()

        bad = tmp_path / "bad.yaml"
        bad.write_text(SEND_WITH_STATUS.format(base=server.url).replace("?id={provider_id}", ""), encoding="utf-8")
        with pytest.raises(HttpConfigError, match=r"bad\.yaml:10:.*status\.url.*\{provider_id\}"):
            load_config(bad, env={})
    finally:
        server.close()


# ------------------------------------------------------------------ the dashboard


@pytest.mark.slow
def test_dashboard_runs_page_and_heat_map_show_delivered_undelivered_and_unconfirmed(project: Project) -> None:
    import httpx

    from tests.conftest import serve_web
    from tests.test_dashboard_browser import add_user, login

    project.registry(size=20, seed=18)
    rt, run_id, rows = one_undelivered_two_unconfirmed(project)
    assert add_user(project, "carol", "auditor", "carol's long password").returncode == 0
    with serve_web(project, project.root / "web.log") as (base, _proc):
        client = httpx.Client(timeout=10)
        assert login(base, "carol", "carol's long password", client).status_code == 303
        page = client.get(base + "/dashboard", headers={"Accept": "text/html"}).text
        assert "<th>delivered</th><th>undelivered</th><th>unconfirmed</th>" in page
        row = page.split(f">{run_id}</td>")[1].split("</tr>")[0]
        cells = re.findall(r"<td>(\d+)</td>", row)
        # total, sent (handed over), delivered, undelivered, unconfirmed, failed, open
        n = len(rows)
        assert cells[1:7] == [str(n), str(n - 3), "1", "2", "1", "0"]
        heat = client.get(base + "/dashboard/coverage", params={"period": quarter_of(rt.clock())}).text
        titles = re.findall(r'title="\d+ of \d+ reached, (\d+) delivered, (\d+) undelivered, (\d+) unconfirmed"', heat)
        assert titles and any(u == "1" for _, u, _ in titles) and any(int(c) >= 1 for _, _, c in titles)


def test_a_run_sent_through_a_failover_list_is_chased_at_the_provider_that_took_each_message(
    any_db_project: Project,
) -> None:
    from prism_support import free_port

    project = any_db_project
    # the primary carrier refuses every connection, so the outbox (second in the list) takes everyone
    project.write(
        "carrier.yaml",
        f"url: http://127.0.0.1:{free_port()}/send\nbody:\n  format: json\n  template:\n"
        '    mobile: "{{to}}"\n    content: "{{body}}"\nresponse:\n  message_id: data.msgid\n',
    )
    project.env.update({"DISPATCH_GATEWAY": "http,outbox", "DISPATCH_HTTP_CONFIG": str(project.root / "carrier.yaml")})
    project.registry(size=30, seed=17)
    clock = Clock()
    rt = project.runtime(clock=clock)
    run_id = run_through(rt, project, clock, name="failover-dlr")
    rows = sent_rows(rt, run_id)
    assert rows and {r.gateway for r in rows} == {"outbox"}

    clock.advance(35 * 60)
    chased = chase_run(rt, run_id)
    assert chased.asked == chased.answered == chased.delivered == len(rows), chased
    assert {e.actor for e in ledger_events(rt, run_id, "delivered")} == {"dlr:outbox"}
    assert verified(rt, run_id)
