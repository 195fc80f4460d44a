"""`dispatch report assessment`, spend and budgets after real runs, checked against counts made here.

Two runs in 2021Q1 on one registry: 社会保障局's retirees campaign over every district, and the
police's campaign over three of six districts, each with some numbers failing at the gateway.
The expected figures come from the registry CSV and the outbox file, never from the database
the reports read; every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher import domain
from tests.conftest import Project
from tests.test_audit_ledger import FAKE_NOW, THREE_DISTRICTS
from tests.test_reports import THREE, registry_rows

RETIREES = """\
id: retirees-q1
title: 退休人员养老诈骗预警（测试）
owner: 社会保障局
channel: sms
template: groups/retirees.sms.j2
variables:
  hotline: "96110"
audience:
  districts: all
  segments: [retirees]
"""

TARGETS = """\
2021:
  default: {coverage: 0.9, pushes: 1}
  Q1:
    social_security: {coverage: 0.9, pushes: 2}
    经济发展局: {coverage: 0.9, pushes: 1}
    henglin: {coverage: 0.5, pushes: 1}
"""

#: the police run's provider price when it was made, and a different one when the report is read
PRICE_AT_RUN = 0.07
PRICE_LATER = 0.5


def _pg_url(base: str) -> Iterator[str]:
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def assessed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.conftest import _make_project

    root = tmp_path_factory.mktemp(f"assessment-{request.param}")
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{root / 'project' / 'var' / 'dispatch.db'}"])
    else:
        urls = _pg_url(request.getfixturevalue("postgres_available"))
    url = next(urls)
    project = _make_project(root / "project", url)
    project.write("targets.yaml", TARGETS)
    rows = registry_rows(project.registry(600, seed=11))
    eligible = [r for r in rows if not r["opted_out"]]
    retirees = [r["phone"] for r in eligible if "retirees" in r["segments"]]
    failing_1 = set(retirees[::9])
    police = [r["phone"] for r in eligible if r["district"] in THREE]
    failing_2 = set(police[::6])
    project.write("campaigns/retirees-q1.yaml", RETIREES)
    project.write("campaigns/ledger-test.yaml", THREE_DISTRICTS)
    env = {"DISPATCH_FAKE_NOW": FAKE_NOW}
    first = project.dispatch(
        "run",
        "campaigns/retirees-q1.yaml",
        "--json",
        env={**env, "DISPATCH_OUTBOX_FAIL_PERMANENT": ",".join(failing_1)},
    )
    assert first.returncode == 0, first.stderr
    second = project.dispatch(
        "run",
        "campaigns/ledger-test.yaml",
        "--json",
        env={
            **env,
            "DISPATCH_OUTBOX_FAIL_PERMANENT": ",".join(failing_2),
            "DISPATCH_PART_PRICES": f"outbox={PRICE_AT_RUN}",
        },
    )
    assert second.returncode == 0, second.stderr
    outbox = [json.loads(line) for line in project.outbox.read_text(encoding="utf-8").splitlines()]
    yield {
        "project": project,
        "rows": rows,
        "reached": {
            r["phone"]
            for r in eligible
            if ("retirees" in r["segments"] and r["phone"] not in failing_1)
            or (r["district"] in THREE and r["phone"] not in failing_2)
        },
        "outbox": outbox,
        "runs": {"social_security": json.loads(first.stdout)["run_id"], "police": json.loads(second.stdout)["run_id"]},
    }
    for _ in urls:  # drops the PostgreSQL schema
        pass


def _report(project: Project, *args: str) -> dict[str, Any]:
    result = project.dispatch(
        "report", "assessment", "--year", "2021", "--json", *args, env={"DISPATCH_FAKE_NOW": FAKE_NOW}
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _expected(rows: list[dict[str, Any]], reached: set[str], members: Any, target: float) -> dict[str, Any]:
    """eligible, reached and the shortfall against ``target`` of the residents ``members`` picks."""
    picked = [r for r in rows if not r["opted_out"] and members(r)]
    n, hit = len(picked), sum(1 for r in picked if r["phone"] in reached)
    return {"eligible": n, "reached": hit, "shortfall": max(0, math.ceil(round(target * n, 9)) - hit)}


def test_assessment_figures_equal_an_independent_count_from_the_registry_and_the_run(assessed: dict[str, Any]) -> None:
    rows, reached = assessed["rows"], assessed["reached"]
    report = _report(assessed["project"])
    q1 = {r["unit"]: r for r in report["rows"] if r["quarter"] == "2021Q1"}
    assert set(q1) == {d.id for d in domain.DISTRICTS} | {s.owner for s in domain.SEGMENTS}
    assert report["runs"] == 2
    for dep in {s.owner for s in domain.SEGMENTS}:
        owned = {s.id for s in domain.SEGMENTS if s.owner == dep}
        want = _expected(rows, reached, lambda r, owned=owned: owned & set(r["segments"]), q1[dep]["target_coverage"])
        got = q1[dep]
        assert {k: got[k] for k in want} == want, dep
        assert got["coverage"] == round(want["reached"] / want["eligible"], 4), dep
    for d in domain.DISTRICTS:
        want = _expected(rows, reached, lambda r, d=d: r["district"] == d.id, q1[d.id]["target_coverage"])
        assert {k: q1[d.id][k] for k in want} == want, d.id
    # nobody was reached in the other quarters, and every unit there misses its target
    later = [r for r in report["rows"] if r["quarter"] != "2021Q1"]
    assert later and all(r["reached"] == 0 and r["pushes"] == 0 and r["met"] is False for r in later)


def test_a_department_meeting_its_target_and_one_missing_it_with_the_shortfall_by_group(
    assessed: dict[str, Any],
) -> None:
    rows, reached = assessed["rows"], assessed["reached"]
    q1 = {r["unit"]: r for r in _report(assessed["project"])["rows"] if r["quarter"] == "2021Q1"}
    # retirees: every district by their own run (one in nine failing) and three districts again by the police
    social = q1["social_security"]
    assert social["coverage"] >= 0.9 and social["pushes"] == 2 and social["met"] is True
    assert social["shortfall"] == 0 and social["shortfall_by_group"] == {}
    # enterprise groups: only the police's three districts (one in six failing there)
    econ = q1["economic_development"]
    assert econ["met"] is False and econ["pushes"] == 1 and econ["coverage"] < 0.9
    for seg in ("enterprise_owners", "accountants", "gatekeepers"):
        want = _expected(rows, reached, lambda r, seg=seg: seg in r["segments"], 0.9)
        assert econ["shortfall_by_group"].get(seg, 0) == want["shortfall"], seg
        group = next(g for g in econ["by_group"] if g["segment"] == seg)
        assert (group["eligible"], group["reached"]) == (want["eligible"], want["reached"]), seg
    owned = {"enterprise_owners", "accountants", "gatekeepers"}
    for d in domain.DISTRICTS:
        want = _expected(rows, reached, lambda r, d=d: r["district"] == d.id and owned & set(r["segments"]), 0.9)
        assert econ["shortfall_by_district"].get(d.id, 0) == want["shortfall"], d.id
    # the districts the police did not cover are all short; the three it covered are reached but for failures
    assert {d.id for d in domain.DISTRICTS if d.id not in THREE} <= set(econ["shortfall_by_district"])


def test_a_town_is_scored_on_the_residents_of_its_district(assessed: dict[str, Any]) -> None:
    rows, reached = assessed["rows"], assessed["reached"]
    q1 = {r["unit"]: r for r in _report(assessed["project"])["rows"] if r["quarter"] == "2021Q1"}
    # 横林镇 got only the retirees run: its own target (0.5) is not met by retirees alone
    henglin = q1["henglin"]
    want = _expected(rows, reached, lambda r: r["district"] == "henglin", 0.5)
    assert {k: henglin[k] for k in want} == want
    assert henglin["target_coverage"] == 0.5 and henglin["pushes"] == 1 and henglin["met"] is False
    by_group = {g["segment"]: g for g in henglin["by_group"]}
    retirees = _expected(rows, reached, lambda r: r["district"] == "henglin" and "retirees" in r["segments"], 0.5)
    assert (by_group["retirees"]["eligible"], by_group["retirees"]["reached"]) == (
        retirees["eligible"],
        retirees["reached"],
    )
    # 潞城街道: both runs reached it; one in six of the police run failing keeps it under the default 90%
    lucheng = q1["lucheng"]
    want = _expected(rows, reached, lambda r: r["district"] == "lucheng", 0.9)
    assert {k: lucheng[k] for k in want} == want and want["shortfall"] > 0
    assert lucheng["pushes"] == 2 and lucheng["met"] is False and lucheng["target_coverage"] == 0.9


def test_assessment_csv_has_the_rows_of_json_and_the_table_names_what_is_not_met(assessed: dict[str, Any]) -> None:
    project = assessed["project"]
    as_json = _report(project)
    as_csv = project.dispatch("report", "assessment", "--year", "2021", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    got = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [
        (r["quarter"], r["unit"], int(r["eligible"]), int(r["reached"]), r["met"], int(r["pushes"])) for r in got
    ] == [
        (r["quarter"], r["unit"], r["eligible"], r["reached"], "yes" if r["met"] else "no", r["pushes"])
        for r in as_json["rows"]
    ]
    econ = next(r for r in got if r["quarter"] == "2021Q1" and r["unit"] == "economic_development")
    assert (
        json.loads(econ["shortfall_by_group"])
        == next(r for r in as_json["rows"] if r["quarter"] == "2021Q1" and r["unit"] == "economic_development")[
            "shortfall_by_group"
        ]
    )
    table = project.dispatch("report", "assessment", "--year", "2021", "--quarter", "Q1")
    assert table.returncode == 0 and "经济发展局" in table.stdout and "not met" in table.stdout


def test_spend_is_accepted_parts_at_the_price_recorded_with_each_run(assessed: dict[str, Any]) -> None:
    """The police run was made at 0.07 CNY a part: a later price (0.5) does not reprice it."""
    project, outbox, runs = assessed["project"], assessed["outbox"], assessed["runs"]
    parts = {owner: sum(m["parts"] for m in outbox if m["run_id"] == run_id) for owner, run_id in runs.items()}
    default = {"outbox": 0.05}  # the documented default price of the outbox
    result = project.dispatch(
        "report", "departments", "--year", "2021", "--json", env={"DISPATCH_PART_PRICES": f"outbox={PRICE_LATER}"}
    )
    assert result.returncode == 0, result.stderr
    deps = {d["department"]: d for d in json.loads(result.stdout)["departments"]}
    assert deps["police"]["spend_cny"] == round(parts["police"] * PRICE_AT_RUN, 2)
    assert deps["social_security"]["spend_cny"] == round(parts["social_security"] * default["outbox"], 2)
    assert deps["police"]["spend_by_quarter"] == {"2021Q1": deps["police"]["spend_cny"]}
    assert deps["tax"]["spend_cny"] == 0.0
    assessment = _report(assessed["project"])
    spend = {(s["quarter"], s["owner"]): s for s in assessment["spend"]}
    assert spend[("2021Q1", "police")]["parts"] == parts["police"]
    assert spend[("2021Q1", "police")]["spend_cny"] == round(parts["police"] * PRICE_AT_RUN, 2)
    social = next(r for r in assessment["rows"] if r["quarter"] == "2021Q1" and r["unit"] == "social_security")
    assert social["spend_cny"] == round(parts["social_security"] * default["outbox"], 2)


# the page reads through the same report as the CLI (checked on both databases above): served once, on SQLite
@pytest.mark.parametrize("assessed", ["sqlite"], indirect=True)
def test_the_dashboard_shows_the_quarter_assessment_with_a_chart_to_logged_in_users(assessed: dict[str, Any]) -> None:
    import httpx

    from tests.conftest import serve_web
    from tests.test_dashboard_browser import add_user, login

    project = assessed["project"]
    assert add_user(project, "dora", "auditor", "dora's long password").returncode == 0
    with serve_web(project, project.root / "web.log") as (base, _proc):
        anonymous = httpx.get(base + "/dashboard/assessment?year=2021&quarter=Q1", follow_redirects=False)
        assert anonymous.status_code == 401 and "economic_development" not in anonymous.text
        client = httpx.Client(timeout=30)
        assert login(base, "dora", "dora's long password", client).status_code == 303
        page = client.get(base + "/dashboard/assessment", params={"year": "2021", "quarter": "Q1"}).text
    assert '<svg id="assessment-chart"' in page and "<script" not in page
    assert 'data-unit="economic_development"' in page and 'data-met="not met"' in page
    assert 'data-unit="social_security"' in page and 'data-met="met"' in page
    row = page.split('<tr data-unit="economic_development">')[1].split("</tr>")[0]
    assert "not met" in row and "企业主" in row


def test_a_broken_targets_file_is_one_line_naming_its_line_and_field(project: Project) -> None:
    project.write(
        "targets.yaml", "2021:\n  default: {coverage: 0.9, pushes: 1}\n  Q2:\n    nosuch: {coverage: 0.9, pushes: 1}\n"
    )
    for args in (["validate"], ["report", "assessment", "--year", "2021"]):
        result = project.dispatch(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines == [lines[0]] and lines[0].startswith("targets.yaml:4: 2021.Q2.nosuch: unknown department or town")
    project.write("targets.yaml", "2021:\n  default: {coverage: 1.5, pushes: 1}\n")
    result = project.dispatch("validate")
    assert result.returncode == 2 and result.stderr.startswith("targets.yaml:2: 2021.default.coverage:"), result.stderr
    project.write("targets.yaml", "2021:\n  Q1:\n    police: {coverage: 0.9, pushes: 1}\n")
    result = project.dispatch("validate")
    assert result.returncode == 2 and "owns no population group" in result.stderr


# ------------------------------------------------------------------ estimates and budgets


def test_preview_and_dry_run_cost_per_district_is_parts_times_the_price(any_db_project: Project) -> None:
    project = any_db_project
    project.registry(300, seed=4)
    env = {"DISPATCH_FAKE_NOW": FAKE_NOW, "DISPATCH_PART_PRICES": "outbox=0.06,twilio=0.05"}
    preview = project.dispatch("preview", "campaigns/quarterly-themes.yaml", "--json", env=env)
    assert preview.returncode == 0, preview.stderr
    p = json.loads(preview.stdout)
    assert p["price_per_part"] == 0.06 and sum(p["parts_by_district"].values()) == p["total_parts"]
    assert p["cost_by_district"] == {d: round(n * 0.06, 2) for d, n in p["parts_by_district"].items()}
    dry = project.dispatch("run", "--dry-run", "campaigns/quarterly-themes.yaml", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    d = json.loads(dry.stdout)
    assert {k: v["parts"] for k, v in d["by_district"].items()} == p["parts_by_district"]
    assert all(v["cost_cny"] == round(v["parts"] * 0.06, 2) for v in d["by_district"].values())
    assert d["cost_cny"] == round(d["parts"] * 0.06, 2) > 0
    table = project.dispatch("run", "--dry-run", "campaigns/quarterly-themes.yaml", env=env)
    assert f"{d['cost_cny']:.2f} CNY" in table.stdout


def test_a_run_over_its_budget_is_refused_with_nothing_written_or_sent(any_db_project: Project) -> None:
    project = any_db_project
    project.registry(200, seed=6)
    text = (project.root / "campaigns" / "retirees-pension-fraud.yaml").read_text(encoding="utf-8")
    project.write("campaigns/retirees-pension-fraud.yaml", text + "budget: 0.5\n")
    env = {"DISPATCH_FAKE_NOW": FAKE_NOW}
    result = project.dispatch("run", "campaigns/retirees-pension-fraud.yaml", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "budget" in lines[0] and "over the budget of 0.5 CNY" in lines[0]
    assert lines[0].startswith("campaigns/retirees-pension-fraud.yaml:")
    assert result.stdout == ""
    runs = json.loads(project.dispatch("runs", "--json").stdout)["runs"]
    assert runs == []
    assert not project.outbox.exists() or project.outbox.read_text() == ""
    # within budget, the same campaign runs
    project.write("campaigns/retirees-pension-fraud.yaml", text + "budget: 100000\n")
    assert project.dispatch("run", "campaigns/retirees-pension-fraud.yaml", env=env).returncode == 0


def test_a_scheduled_fire_over_its_budget_creates_no_run_and_is_recorded_skipped(project: Project) -> None:
    from datetime import UTC, datetime

    from dispatcher.clock import SettableClock
    from tests.test_scheduler import SH, _only, _scheduler

    _only(project, "quarterly-themes")
    path = project.root / "campaigns" / "quarterly-themes.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "budget: 0.5\n", encoding="utf-8")
    project.registry(size=40, seed=5)
    rt, sched = _scheduler(project, SettableClock(datetime(2023, 7, 5, 10, 0, 1, tzinfo=SH)))
    entry = next(iter(sched.entries.values()))
    assert sched.fire(entry, datetime(2023, 7, 5, 10, 0, tzinfo=SH).astimezone(UTC)) is None
    assert rt.store.list_runs(campaign_id="quarterly-themes") == []
    (fire,) = rt.store.coordination.list_fires("quarterly-themes")
    assert fire.status == "skipped" and "over the budget of 0.5 CNY" in (fire.reason or "")
    assert not project.outbox.exists()


def test_a_version_6_log_gains_run_prices_and_its_older_runs_are_priced_at_todays_prices(
    any_db_project: Project,
) -> None:
    import sqlalchemy as sa

    project = any_db_project
    project.registry(60, seed=8)
    project.write("campaigns/ledger-test.yaml", THREE_DISTRICTS)
    first = project.dispatch("run", "campaigns/ledger-test.yaml", "--json", env={"DISPATCH_FAKE_NOW": FAKE_NOW})
    assert first.returncode == 0, first.stderr
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.begin() as conn:  # what a version 6 program left: no prices recorded with its runs
        conn.execute(sa.text("DROP TABLE run_prices"))
        conn.execute(sa.text("UPDATE dispatch_meta SET value = '6' WHERE key = 'schema_version'"))
    engine.dispose()
    parts = sum(json.loads(line)["parts"] for line in project.outbox.read_text(encoding="utf-8").splitlines())
    result = project.dispatch(
        "report", "departments", "--year", "2021", "--json", env={"DISPATCH_PART_PRICES": "outbox=0.08"}
    )
    assert result.returncode == 0, result.stderr
    police = next(d for d in json.loads(result.stdout)["departments"] if d["department"] == "police")
    assert police["spend_cny"] == round(parts * 0.08, 2) > 0
    # the upgraded log records the prices of the runs made from now on
    again = project.dispatch(
        "run", "campaigns/ledger-test.yaml", "--again", "--reason", "drill", env={"DISPATCH_FAKE_NOW": FAKE_NOW}
    )
    assert again.returncode == 0, again.stderr
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.connect() as conn:
        prices = dict(conn.execute(sa.text("SELECT gateway, price_per_part FROM run_prices")).all())
    engine.dispose()
    assert prices == {"twilio": 0.05, "http": 0.045, "kannel": 0.04, "outbox": 0.05}
