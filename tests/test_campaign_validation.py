"""Bad campaign input is refused with one line naming file, line and field; nothing is sent."""

from __future__ import annotations

import re

import pytest

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
    assert result.stdout.count("ok ") == 5


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
    for args in (("status",), ("run", "--bogus", "x"), ("audience", "generate", "--size", "0"), ("nosuch",)):
        result = project.dispatch(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Error:" in result.stderr and "Traceback" not in result.stderr and "internal error" not in result.stderr
