"""`dispatch run --as-of DATE`: the theme of that date's quarter, the date recorded on the run."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from dispatcher.store import schema as t
from tests.conftest import Project

CAMPAIGN = "campaigns/quarterly-themes.yaml"


def _fixed_text(project: Project, template: str) -> str:
    """The part of a theme template that renders the same for everyone (between the greeting and the hotline)."""
    text = (project.root / "templates" / template).read_text(encoding="utf-8")
    return text.split("您好：", 1)[1].split("{{", 1)[0]


def test_run_as_of_a_date_sends_that_quarters_theme_and_records_the_date(project: Project) -> None:
    project.registry(size=30, seed=6)
    result = project.dispatch("run", CAMPAIGN, "--as-of", "2021-08-01", "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert st["template"] == "themes/investment.sms.j2"
    assert st["as_of"] == "2021-08-01T00:00:00+08:00"
    bodies = [json.loads(line)["body"] for line in project.outbox.read_text(encoding="utf-8").splitlines()]
    assert len(bodies) == st["counts"]["sent"] > 0
    q3 = _fixed_text(project, "themes/investment.sms.j2")
    assert all(q3 in body for body in bodies)

    status = project.dispatch("status", st["run_id"], "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["as_of"] == "2021-08-01T00:00:00+08:00"
    text = project.dispatch("status", st["run_id"])
    assert "as of 2021-08-01T00:00:00+08:00" in text.stdout


@pytest.mark.parametrize(
    ("as_of", "template"),
    [
        ("2021-06-30T23:30", "themes/impersonating_police.sms.j2"),  # Shanghai time: still Q2
        ("2021-06-30T23:30+00:00", "themes/investment.sms.j2"),  # 07:30 on 1 July in Shanghai: Q3
    ],
)
def test_as_of_is_read_in_the_campaigns_time_zone(project: Project, as_of: str, template: str) -> None:
    project.registry(size=10, seed=7)
    result = project.dispatch("run", CAMPAIGN, "--as-of", as_of, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["template"] == template


def test_a_bad_as_of_date_is_one_line_and_exit_2(project: Project) -> None:
    project.registry(size=10, seed=7)
    result = project.dispatch("run", CAMPAIGN, "--as-of", "next summer")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "as-of: expected an ISO date or date-time such as 2021-08-01 or 2021-08-01T10:00, got 'next summer'"
    )
    assert not project.outbox.exists()


def test_a_delivery_log_of_the_previous_schema_version_gains_the_as_of_column(any_db_project: Project) -> None:
    project = any_db_project
    project.registry(size=10, seed=8)
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.begin() as conn:  # the delivery log as version 1 left it
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN as_of"))
        conn.execute(sa.update(t.meta).where(t.meta.c.key == "schema_version").values(value="1"))
    result = project.dispatch("run", CAMPAIGN, "--as-of", "2022-02-01", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["as_of"] == "2022-02-01T00:00:00+08:00"
    with engine.connect() as conn:
        version = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == "schema_version")).scalar_one()
    engine.dispose()
    assert int(version) == t.SCHEMA_VERSION


SUMMER = (
    "id: summer\ntitle: 暑期反诈\nowner: 公安分局\n"
    "themes: {Q3: themes/investment.sms.j2}\n"
    'variables: {hotline: "96110"}\n'
    'schedule: {yearly: {month: 7, day: 5, at: "10:00"}}\n'
)
NOVEMBER = {"DISPATCH_FAKE_NOW": "2026-11-10T10:00:00+08:00"}


def test_manual_run_in_a_quarter_without_a_theme_is_refused_until_given_a_date_in_one(project: Project) -> None:
    project.registry(size=10, seed=9)
    project.write("campaigns/summer.yaml", SUMMER)
    november = NOVEMBER
    refused = project.dispatch("run", "campaigns/summer.yaml", env=november)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        "campaigns/summer.yaml:4:1: themes: no theme for Q4 (the run is as of 2026-11-10); "
        "the themes cover Q3: give --as-of a date in one of those quarters"
    )
    assert not project.outbox.exists()
    made_up = project.dispatch("run", "campaigns/summer.yaml", "--as-of", "2026-07-05", "--json", env=november)
    assert made_up.returncode == 0, made_up.stderr
    assert json.loads(made_up.stdout)["template"] == "themes/investment.sms.j2"


def test_preview_outside_the_themed_quarter_shows_the_next_fires_theme(project: Project) -> None:
    project.registry(size=10, seed=9)
    project.write("campaigns/summer.yaml", SUMMER)
    result = project.dispatch("preview", "campaigns/summer.yaml", "--json", env=NOVEMBER)
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    assert preview["template_now"] == "themes/investment.sms.j2" and preview["recipients"] == 10
