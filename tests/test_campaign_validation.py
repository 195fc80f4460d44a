"""Bad campaign input is refused with one line naming file, line and field; nothing is sent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dispatcher import domain
from tests.conftest import Project

GOOD = """\
id: drill
title: 演练
owner: 公安分局
template: themes/brushing.sms.j2
variables:
  hotline: "96110"
audience:
  districts: [横林镇]
"""

LINE_RE = re.compile(r"^(?P<path>[^:]+\.ya?ml|[^:]+\.j2):(?P<line>\d+)(:(?P<col>\d+))?: (?P<rest>.+)$")


def _one_line_error(result) -> re.Match[str]:  # type: ignore[no-untyped-def]
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    match = LINE_RE.match(lines[0])
    assert match, lines[0]
    return match


def test_shipped_campaigns_validate(project: Project) -> None:
    result = project.dispatch("validate", "campaigns")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == 6


@pytest.mark.parametrize(
    ("edit", "line", "field", "words"),
    [
        (lambda s: s.replace("[横林镇]", "[横林镇, 武进区]"), 8, "audience.districts.1", "unknown district '武进区'"),
        (lambda s: s + "  segments: [astronauts]\n", 9, "audience.segments.0", "unknown segment 'astronauts'"),
        (lambda s: s.replace("themes/brushing.sms.j2", "themes/nope.sms.j2"), 4, "template", "not found"),
        (lambda s: s.replace('  hotline: "96110"\n', '  other: "x"\n'), 5, "variables", "needs hotline"),
        (lambda s: s.replace("owner: 公安分局", "owner: 宣传部"), 3, "owner", "unknown department"),
        (lambda s: s.replace("title: 演练", "title: 演练\ncolour: red"), 3, "colour", "unknown field"),
        (lambda s: s.replace("id: drill\n", ""), 1, None, "id"),
        (lambda s: s + "themes: {Q1: themes/loan.sms.j2}\n", 1, None, "either template or themes"),
        (lambda s: s + "send_by: tomorrow-ish\n", 9, "send_by", ""),
        (lambda s: s.replace("audience:\n", "audience: [\n"), 7, None, "invalid YAML"),
    ],
)
def test_bad_campaign_is_refused_with_file_line_and_field(
    project: Project,
    edit,
    line: int,
    field: str | None,
    words: str,  # type: ignore[no-untyped-def]
) -> None:
    path = project.write("campaigns/drill.yaml", edit(GOOD))
    for command in (("validate", str(path)), ("run", str(path))):
        match = _one_line_error(project.dispatch(*command))
        assert match["path"].endswith("drill.yaml")
        assert int(match["line"]) == line, match.group(0)
        if field:
            assert match["rest"].startswith(f"{field}: "), match.group(0)
        assert words in match["rest"], match.group(0)
    assert not project.outbox.exists(), "a refused campaign must send nothing"


def test_message_that_can_never_fit_500_characters_is_refused(project: Project) -> None:
    project.write("templates/long.sms.j2", "防诈" * 250)
    path = project.write("campaigns/drill.yaml", GOOD.replace("themes/brushing.sms.j2", "long.sms.j2"))
    match = _one_line_error(project.dispatch("validate", str(path)))
    assert "the limit is 500" in match["rest"]
    assert match["rest"].startswith("template: ")


def test_template_syntax_error_points_into_the_template(project: Project) -> None:
    project.write("templates/broken.sms.j2", "您好\n{{ recipient.name \n")
    path = project.write("campaigns/drill.yaml", GOOD.replace("themes/brushing.sms.j2", "broken.sms.j2"))
    match = _one_line_error(project.dispatch("validate", str(path)))
    assert match["path"].endswith("broken.sms.j2")
    assert "syntax error" in match["rest"]


def test_template_reading_an_unknown_recipient_attribute_is_refused(project: Project) -> None:
    project.write("templates/attr.sms.j2", "{{ recipient.age }}岁的{{ recipient.name }}您好，拨{{ hotline }}")
    path = project.write("campaigns/drill.yaml", GOOD.replace("themes/brushing.sms.j2", "attr.sms.j2"))
    match = _one_line_error(project.dispatch("validate", str(path)))
    assert "age" in match["rest"]


def test_sandbox_refuses_access_to_python_internals(project: Project) -> None:
    project.write("templates/evil.sms.j2", "{{ recipient.__class__.__mro__ }}{{ hotline }}")
    path = project.write("campaigns/drill.yaml", GOOD.replace("themes/brushing.sms.j2", "evil.sms.j2"))
    result = project.dispatch("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_validate_reports_every_problem_of_every_file(project: Project) -> None:
    project.write("campaigns/a.yaml", GOOD.replace("[横林镇]", "[火星]").replace("id: drill", "id: drill-a"))
    project.write(
        "campaigns/b.yaml", GOOD.replace("owner: 公安分局", "owner: nobody").replace("id: drill", "id: drill-b")
    )
    result = project.dispatch("validate", "campaigns")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 2
    assert any("a.yaml:8" in e and "火星" in e for e in errors)
    assert any("b.yaml:3" in e and "owner" in e for e in errors)


def test_duplicate_campaign_ids_are_refused(project: Project) -> None:
    project.write("campaigns/copy.yaml", (project.root / "campaigns/parents-school-fees.yaml").read_text())
    result = project.dispatch("validate", "campaigns")
    assert result.returncode == 2
    assert "also used by" in result.stderr


def test_themes_pick_the_template_of_the_quarter(project: Project) -> None:
    from datetime import datetime
    from pathlib import Path
    from zoneinfo import ZoneInfo

    from dispatcher.campaigns import load_campaign

    loaded = load_campaign(project.root / "campaigns/quarterly-themes.yaml", Path(project.root / "templates"))
    tz = ZoneInfo("Asia/Shanghai")
    picks = {
        q: loaded.campaign.template_for(datetime(2021, m, 1, 0, 30, tzinfo=tz))
        for q, m in (("Q1", 1), ("Q2", 4), ("Q3", 7), ("Q4", 10))
    }
    assert picks == {
        "Q1": "themes/brushing.sms.j2",
        "Q2": "themes/impersonating_police.sms.j2",
        "Q3": "themes/investment.sms.j2",
        "Q4": "themes/loan.sms.j2",
    }


def test_command_line_mistakes_get_click_usage_and_exit_2_without_a_traceback(project: Project) -> None:
    for args in (("pause",), ("run", "--bogus", "x"), ("audience", "generate", "--size", "0"), ("nosuch",)):
        result = project.dispatch(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Error:" in result.stderr and "Traceback" not in result.stderr and "internal error" not in result.stderr
    # status without a run shows the newest; with none yet it says how to make one
    empty = project.dispatch("status")
    assert empty.returncode == 2 and "no runs yet" in empty.stderr and "Traceback" not in empty.stderr


# ------------------------------------------------------------------ schedules, themes and the vocabulary


def _scheduled_drill(project: Project, schedule: str, themes: str | None = None, name: str = "drill") -> Path:
    """The drill campaign with a schedule block (indented YAML lines) and optionally themes instead of a template."""
    text = GOOD.replace("id: drill", f"id: {name}")
    if themes is not None:
        text = text.replace("template: themes/brushing.sms.j2\n", f"themes: {themes}\n")
    return project.write(f"campaigns/{name}.yaml", text + "schedule:\n" + schedule)


def test_yearly_schedule_fires_once_a_year_on_its_date_with_that_quarters_theme(project: Project) -> None:
    _scheduled_drill(
        project,
        '  yearly: {month: 7, day: 5, at: "10:00"}\n  timezone: Asia/Shanghai\n',
        themes="{Q3: themes/investment.sms.j2}",
    )
    assert project.dispatch("validate", "campaigns/drill.yaml").returncode == 0
    result = project.dispatch(
        "schedule", "list", "--from", "2026-01-01", "--until", "2029-01-01", "--count", "10", "--json"
    )
    assert result.returncode == 0, result.stderr
    item = next(c for c in json.loads(result.stdout)["campaigns"] if c["campaign_id"] == "drill")
    assert item["kind"] == "yearly"
    assert [(f["fire_time"], f["template"]) for f in item["fires"]] == [
        (f"{year}-07-05T10:00:00+08:00", "themes/investment.sms.j2") for year in (2026, 2027, 2028)
    ]


@pytest.mark.parametrize(
    ("schedule", "field", "words"),
    [
        ("quarterly: {month: 4}", "schedule.quarterly.month", "month: 1-3, the month within each quarter"),
        ("quarterly: {month: 1, at: '9am'}", "schedule.quarterly.at", "at: HH:MM, local time"),
        ("quarterly: {months: 1}", "schedule.quarterly.months", "quarterly takes month: 1-3"),
        ("quarterly: {month: 2, day: 30}", "schedule.quarterly", "day: 1-31, the day of that month"),
        ("yearly: {month: 13, day: 1}", "schedule.yearly.month", "month: 1-12, the month of the year"),
        ("yearly: {month: 7}", "schedule.yearly.day", "day: 1-31, the day of that month"),
        ("yearly: {month: 2, day: 29}", "schedule.yearly", "use 1-28"),
        ("yearly: {month: 7, day: 5}\n  cron: '0 9 * * *'", "schedule", "exactly one of cron, quarterly, yearly"),
    ],
)
def test_schedule_form_errors_say_what_each_field_means(
    project: Project, schedule: str, field: str, words: str
) -> None:
    path = _scheduled_drill(project, f"  {schedule}\n")
    for command in (("validate", str(path)), ("run", str(path))):
        match = _one_line_error(project.dispatch(*command))
        assert int(match["line"]) in (9, 10), match.group(0)
        assert match["rest"].startswith(f"{field}: "), match.group(0)
        assert words in match["rest"], match.group(0)
    assert not project.outbox.exists()


def test_themes_missing_a_quarter_the_schedule_fires_in_are_refused(project: Project) -> None:
    path = _scheduled_drill(
        project,
        '  yearly: {month: 7, day: 5, at: "10:00"}\n  start: 2026-01-01\n',
        themes="{Q1: themes/brushing.sms.j2, Q2: themes/loan.sms.j2}",
    )
    for command in (("validate", str(path)), ("run", str(path))):
        match = _one_line_error(project.dispatch(*command))
        assert (match["line"], match["col"]) == ("4", "1")
        assert match["rest"] == "themes: no theme for Q3, but the schedule fires on 2026-07-05 10:00", match.group(0)
    assert not project.outbox.exists()


def test_themes_need_only_the_quarters_between_the_schedules_start_and_end(project: Project) -> None:
    path = _scheduled_drill(
        project,
        '  quarterly: {month: 1, day: 5, at: "10:00"}\n  start: 2026-01-01\n  end: 2026-06-30\n',
        themes="{Q1: themes/brushing.sms.j2, Q2: themes/loan.sms.j2}",
    )
    assert project.dispatch("validate", str(path)).returncode == 0
    path.write_text(path.read_text(encoding="utf-8").replace("2026-06-30", "2026-07-06"), encoding="utf-8")
    match = _one_line_error(project.dispatch("validate", str(path)))
    assert match["rest"] == "themes: no theme for Q3, but the schedule fires on 2026-07-05 10:00"


def test_unscheduled_campaign_with_themes_needs_all_four_quarters(project: Project) -> None:
    text = GOOD.replace(
        "template: themes/brushing.sms.j2\n", "themes: {Q1: themes/brushing.sms.j2, Q2: themes/loan.sms.j2}\n"
    )
    path = project.write("campaigns/drill.yaml", text)
    for command in (("validate", str(path)), ("run", str(path))):
        match = _one_line_error(project.dispatch(*command))
        assert match["rest"].startswith("themes: no theme for Q3, Q4"), match.group(0)
    assert not project.outbox.exists()


@pytest.mark.parametrize(
    ("bounds", "field", "words"),
    [
        ("  start: 2027-01-01\n  end: 2026-01-01\n", "schedule.end", "ends (2026-01-01 00:00) before it starts"),
        ("  start: 2026-08-01\n  end: 2027-06-30\n", "schedule", "never fires between its start"),
    ],
)
def test_schedule_that_ends_before_it_starts_or_never_fires_is_refused(
    project: Project, bounds: str, field: str, words: str
) -> None:
    path = _scheduled_drill(project, '  yearly: {month: 7, day: 5, at: "10:00"}\n' + bounds)
    for command in (("validate", str(path)), ("run", str(path)), ("run", "--dry-run", str(path))):
        match = _one_line_error(project.dispatch(*command))
        assert match["rest"].startswith(f"{field}: "), match.group(0)
        assert words in match["rest"], match.group(0)
    assert not project.outbox.exists()


def test_run_of_a_campaign_whose_schedule_has_ended_is_refused_unless_made_up_as_of_a_date_within(
    project: Project,
) -> None:
    project.registry(size=20, seed=4)
    path = _scheduled_drill(
        project, '  quarterly: {month: 1, day: 5, at: "10:00"}\n  start: 2021-01-01\n  end: 2023-12-31\n'
    )
    match = _one_line_error(project.dispatch("run", str(path)))
    assert match["rest"].startswith("schedule.end: the schedule ended on 2023-12-31 00:00"), match.group(0)
    match = _one_line_error(project.dispatch("run", str(path), "--as-of", "2024-01-05"))
    assert match["rest"].startswith("schedule.end: --as-of 2024-01-05 is after the schedule ends"), match.group(0)
    match = _one_line_error(project.dispatch("run", str(path), "--as-of", "2020-10-05"))
    assert match["rest"].startswith("schedule.start: --as-of 2020-10-05 is before the schedule starts"), match.group(0)
    assert not project.outbox.exists()
    made_up = project.dispatch("run", str(path), "--as-of", "2023-10-05", "--json")
    assert made_up.returncode == 0, made_up.stderr
    st = json.loads(made_up.stdout)
    assert st["counts"].get("sent", 0) > 0 and st["open"] == 0 and st["as_of"].startswith("2023-10-05T00:00")


def test_unknown_names_are_answered_with_every_valid_one_on_one_line(project: Project) -> None:
    path = project.write("campaigns/drill.yaml", GOOD.replace("owner: 公安分局", "owner: 宣传部"))
    match = _one_line_error(project.dispatch("validate", str(path)))
    for d in domain.DEPARTMENTS:
        assert f"{d.id} ({d.name})" in match["rest"], match.group(0)
    path.write_text(GOOD + "  segments: [astronauts]\n", encoding="utf-8")
    match = _one_line_error(project.dispatch("validate", str(path)))
    for s in domain.SEGMENTS:
        assert f"{s.id} ({s.name})" in match["rest"], match.group(0)
    path.write_text(GOOD.replace("[横林镇]", "[横林]"), encoding="utf-8")
    match = _one_line_error(project.dispatch("validate", str(path)))
    assert "known: all, or" in match["rest"]
    for district in domain.DISTRICTS:
        assert f"{district.id} ({district.name})" in match["rest"], match.group(0)


def test_grid_outside_the_selected_districts_is_refused_naming_them(project: Project) -> None:
    path = project.write(
        "campaigns/drill.yaml", GOOD.replace("[横林镇]", "[横林镇, lucheng]") + "  grids: [HL-03, YG-01]\n"
    )
    for command in (("validate", str(path)), ("run", str(path))):
        match = _one_line_error(project.dispatch(*command))
        assert int(match["line"]) == 9
        assert match["rest"] == (
            "audience.grids.1: grid 'YG-01' is in 遥观镇, which the audience does not include "
            "(districts: 横林镇, 潞城街道); a grid only narrows a district that is selected"
        ), match.group(0)
    assert not project.outbox.exists()
