"""`dispatch report coverage|departments|failures` after a real run, checked against counts made here.

The expected figures are computed independently from the registry CSV the run was
imported from (and the list of numbers the outbox was told to fail), never from
the database the reports read.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dispatcher import domain
from dispatcher.phones import normalise
from tests.conftest import Project
from tests.test_audit_ledger import FAKE_NOW, THREE_DISTRICTS

THREE = ("lucheng", "dingyan", "qishuyan")


def registry_rows(path: Path) -> list[dict[str, Any]]:
    """The registry as the import keeps it: first row per phone, ids for districts."""
    seen: set[str] = set()
    rows = []
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            phone = normalise(row["phone"])
            if phone in seen:
                continue
            seen.add(phone)
            district = domain.district(row["district"])
            assert district is not None
            segments = [s for s in (row["segments"] or "").split(";") if s]
            rows.append(
                {
                    "phone": phone,
                    "district": district.id,
                    "segments": segments,
                    "opted_out": row["opted_out"] == "true",
                }
            )
    return rows


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One project: a 600-resident registry, a run over three of six districts with some numbers failing."""
    from tests.conftest import _make_project

    root = tmp_path_factory.mktemp("reports")
    project = _make_project(root / "project", f"sqlite:///{root / 'project' / 'var' / 'dispatch.db'}")
    csv_path = project.registry(600, seed=11)
    rows = registry_rows(csv_path)
    # every 7th eligible resident of lucheng fails permanently at the gateway
    lucheng = [r["phone"] for r in rows if r["district"] == "lucheng" and not r["opted_out"]]
    failing = set(lucheng[::7])
    project.write("campaigns/ledger-test.yaml", THREE_DISTRICTS)
    env = {"DISPATCH_FAKE_NOW": FAKE_NOW, "DISPATCH_OUTBOX_FAIL_PERMANENT": ",".join(sorted(failing))}
    result = project.dispatch("run", "campaigns/ledger-test.yaml", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {"project": project, "rows": rows, "failing": failing}


def expected_coverage(rows: list[dict[str, Any]], failing: set[str]) -> dict[tuple[str, str], tuple[int, int]]:
    cells: dict[tuple[str, str], list[int]] = {(d.id, s.id): [0, 0] for d in domain.DISTRICTS for s in domain.SEGMENTS}
    for r in rows:
        if r["opted_out"]:
            continue
        for seg in r["segments"]:
            cells[(r["district"], seg)][0] += 1
            if r["district"] in THREE and r["phone"] not in failing:
                cells[(r["district"], seg)][1] += 1
    return {k: (v[0], v[1]) for k, v in cells.items()}


def test_coverage_of_a_three_district_run_matches_an_independent_count(reported: dict[str, Any]) -> None:
    project = reported["project"]
    result = project.dispatch("report", "coverage", "--period", "2021Q1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == 1
    expected = expected_coverage(reported["rows"], reported["failing"])
    got = {(c["district"], c["segment"]): c for c in report["cells"]}
    assert len(got) == len(domain.DISTRICTS) * len(domain.SEGMENTS)
    for key, (eligible, reached) in expected.items():
        cell = got[key]
        assert (cell["eligible"], cell["reached"]) == (eligible, reached), key
        assert cell["percent"] == (round(100.0 * reached / eligible, 1) if eligible else 0.0), key
        assert cell["delivered"] == 0  # the outbox gives no delivery receipts
    by_district = {d["district"]: d for d in report["districts"]}
    for d in domain.DISTRICTS:
        if d.id in THREE:
            assert by_district[d.id]["reached"] > 0
        else:
            assert by_district[d.id]["percent"] == 0.0 and by_district[d.id]["eligible"] > 0
    # lucheng lost every 7th resident, so it is below 100%; the other two are at 100%
    assert 80.0 < by_district["lucheng"]["percent"] < 100.0
    assert by_district["dingyan"]["percent"] == by_district["qishuyan"]["percent"] == 100.0


def test_coverage_of_a_period_without_runs_is_all_zero(reported: dict[str, Any]) -> None:
    report = json.loads(reported["project"].dispatch("report", "coverage", "--period", "2021Q2", "--json").stdout)
    assert report["runs"] == 0
    assert all(c["reached"] == 0 and c["percent"] == 0.0 for c in report["cells"])
    assert sum(c["eligible"] for c in report["cells"]) > 0


def test_coverage_csv_has_the_same_cells_as_json(reported: dict[str, Any]) -> None:
    project = reported["project"]
    as_json = json.loads(project.dispatch("report", "coverage", "--period", "2021Q1", "--json").stdout)
    as_csv = project.dispatch("report", "coverage", "--period", "2021Q1", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [
        (r["district"], r["segment"], int(r["eligible"]), int(r["reached"]), float(r["percent"])) for r in rows
    ] == [(c["district"], c["segment"], c["eligible"], c["reached"], c["percent"]) for c in as_json["cells"]]


def test_departments_report_credits_the_owner_with_recipients_failures_and_parts(
    reported: dict[str, Any],
) -> None:
    project = reported["project"]
    result = project.dispatch("report", "departments", "--year", "2021", "--json")
    assert result.returncode == 0, result.stderr
    deps = {d["department"]: d for d in json.loads(result.stdout)["departments"]}
    assert set(deps) == {d.id for d in domain.DEPARTMENTS}
    police = deps["police"]
    recipients = sum(1 for r in reported["rows"] if r["district"] in THREE and not r["opted_out"])
    failing = len(reported["failing"])
    assert (police["campaigns"], police["runs"]) == (1, 1)
    assert police["recipients"] == recipients
    assert police["sent"] == recipients - failing
    assert police["failed"] == failing and sum(police["failed_by_cause"].values()) == failing
    assert police["parts_sent"] >= police["sent"]
    assert all(d["runs"] == 0 and d["recipients"] == 0 for k, d in deps.items() if k != "police")
    # a year without runs
    empty = json.loads(project.dispatch("report", "departments", "--year", "2022", "--json").stdout)
    assert all(d["runs"] == 0 for d in empty["departments"])
    as_csv = list(
        csv.DictReader(
            io.StringIO(project.dispatch("report", "departments", "--year", "2021", "--format", "csv").stdout)
        )
    )
    assert {r["department"]: int(r["failed"]) for r in as_csv}["police"] == failing


def test_failures_report_groups_by_error_code_and_gateway(reported: dict[str, Any]) -> None:
    project = reported["project"]
    report = json.loads(project.dispatch("report", "failures", "--json").stdout)
    assert sum(r["count"] for r in report["failures"]) == len(reported["failing"])
    assert {r["gateway"] for r in report["failures"]} == {"outbox"}
    assert all(r["error_code"] for r in report["failures"])
    table = project.dispatch("report", "failures")
    assert table.returncode == 0 and "outbox" in table.stdout
    codes = Counter(
        r["error_code"]
        for r in csv.DictReader(io.StringIO(project.dispatch("report", "failures", "--format", "csv").stdout))
    )
    assert set(codes) == set(report["by_error_code"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["coverage", "--period", "2021Q5"], "--period"),
        (["coverage", "--period", "spring"], "--period"),
        (["departments", "--year", "21"], "--year"),
        (["failures", "--format", "xls"], "--format"),
    ],
)
def test_reports_refuse_bad_periods_and_formats_with_one_line(project: Project, args: list[str], needle: str) -> None:
    result = project.dispatch("report", *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_reports_on_postgresql_match_a_raw_sql_count(tmp_path: Path, postgres_url: str) -> None:
    """The same report queries on PostgreSQL, against a count written by hand in SQL."""
    import sqlalchemy as sa

    from tests.conftest import _make_project
    from tests.test_audit_ledger import run_campaign

    project = _make_project(tmp_path / "project", postgres_url)
    run_campaign(project, size=200)
    report = json.loads(project.dispatch("report", "coverage", "--period", "2021Q1", "--json").stdout)
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        raw = {
            (d, s): (int(n), int(r))
            for d, s, n, r in conn.execute(
                sa.text(
                    "SELECT r.district, rs.segment, COUNT(*), "
                    "COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM deliveries d "
                    "  WHERE d.resident_id = r.id AND d.state IN ('sent', 'delivered'))) "
                    "FROM residents r JOIN resident_segments rs ON rs.resident_id = r.id "
                    "WHERE NOT r.opted_out GROUP BY r.district, rs.segment"
                )
            )
        }
        sent_rows = int(conn.execute(sa.text("SELECT COUNT(*) FROM deliveries WHERE state = 'sent'")).scalar_one())
        parts = int(conn.execute(sa.text("SELECT SUM(parts) FROM deliveries WHERE state = 'sent'")).scalar_one())
    engine.dispose()
    got = {(c["district"], c["segment"]): (c["eligible"], c["reached"]) for c in report["cells"] if c["eligible"]}
    assert got == raw
    assert {d["district"] for d in report["districts"] if d["reached"]} == set(THREE)
    deps = json.loads(project.dispatch("report", "departments", "--year", "2021", "--json").stdout)["departments"]
    police = next(d for d in deps if d["department"] == "police")
    assert (police["sent"], police["parts_sent"], police["runs"]) == (sent_rows, parts, 1)
    assert project.dispatch("report", "failures", "--json").returncode == 0
    # the audit chain's tail row is created on PostgreSQL too, and verify covers it
    assert project.dispatch("audit", "log", "--unmask", "--format", "csv", "--limit", "1").returncode == 0
    verified = project.dispatch("audit", "verify")
    assert verified.returncode == 0 and "ok audit: 1 events" in verified.stdout, verified.stdout + verified.stderr
