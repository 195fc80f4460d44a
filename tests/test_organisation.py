"""The plan's organisation as data (organisation.yaml), who may target what, and the plan's themes by year.

Everything here runs against the shipped organisation.yaml and themes.yaml (copied into the
test project), through the real `dispatch` command where an operator would meet the rule.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from dispatcher import domain
from dispatcher.campaigns import load_campaign, make_trigger, next_after, upcoming_fires
from dispatcher.organisation import DEFAULT_PATH
from dispatcher.scheduler import Scheduler
from tests.conftest import ROOT, Project

SHANGHAI = ZoneInfo("Asia/Shanghai")
LINE_RE = re.compile(r"^(?P<path>[^:]+\.ya?ml):(?P<line>\d+)(:(?P<col>\d+))?: (?P<field>[^:]+): (?P<message>.+)$")
PLAN_CAMPAIGN = "campaigns/plan-2021-2023-themes.yaml"


def _campaign(owner: str, audience: str, extra: str = "") -> str:
    return (
        f"id: drill\ntitle: 演练\nowner: {owner}\n{extra}template: themes/brushing.sms.j2\n"
        f'variables:\n  hotline: "96110"\naudience:\n{audience}'
    )


def _one_line(result) -> re.Match[str]:  # type: ignore[no-untyped-def]
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    match = LINE_RE.match(lines[0])
    assert match, lines[0]
    return match


def test_the_shipped_organisation_is_the_one_packaged_for_a_bare_install() -> None:
    assert (ROOT / "organisation.yaml").read_bytes() == DEFAULT_PATH.read_bytes()


def test_the_plans_departments_towns_groups_and_police_grids_are_in_the_organisation() -> None:
    for name in ("政法和应急管理局", "法院", "检察院", "综合执法局", "财政局"):
        assert domain.department(name) is not None, name
    town = domain.department("潞城街道")
    assert town is not None and town.kind == "town" and town.district == "lucheng" == town.id
    assert domain.department("公安分局").kind == "department"  # type: ignore[union-attr]
    teenagers = domain.segment("青少年")
    assert teenagers is not None and teenagers.owner == "party_mass" and domain.segment("青年") is None
    assert domain.segment("patients").owner == "social_affairs"  # type: ignore[union-attr]  # 医院、药店
    assert domain.segment("shopkeepers").owner == "law_enforcement"  # type: ignore[union-attr]
    assert domain.segment("liaisons").name == "反电诈联络员（一企一员）"  # type: ignore[union-attr]
    pg = domain.police_grid_of("hl-05")
    assert pg is not None and pg.id == "HL-J2" and pg.police_station == "横林派出所" and "HL-05" in pg.grids
    assert domain.district_of_grid("QSY-12").id == "qishuyan"  # type: ignore[union-attr]
    assert all(len(d.grids) == 12 for d in domain.DISTRICTS) and domain.GRIDS_PER_DISTRICT == 12
    assert domain.current().assessed_by == "political_legal"


def test_a_town_campaign_is_accepted_for_its_own_district_and_refused_for_another(project: Project) -> None:
    own = project.write(
        "campaigns/drill.yaml", _campaign("潞城街道", "  districts: [lucheng]\n  segments: [retirees]\n")
    )
    result = project.dispatch("validate", str(own))
    assert result.returncode == 0, result.stderr

    own.write_text(_campaign("潞城街道", "  districts: [lucheng, henglin]\n"), encoding="utf-8")
    match = _one_line(project.dispatch("validate", str(own)))
    assert match["field"] == "audience.districts.1" and match["line"] == "8", match.group(0)
    assert "横林镇 is not 潞城街道's district" in match["message"]

    own.write_text(_campaign("潞城街道", "  districts: all\n"), encoding="utf-8")
    match = _one_line(project.dispatch("run", str(own)))  # refused before anything is written or sent
    assert match["field"] == "audience.districts" and "only its own district" in match["message"]
    assert not project.outbox.exists()

    # a second street sharing the campaign brings its own district
    own.write_text(
        _campaign("潞城街道", "  districts: [lucheng, dingyan]\n", "co_owners: [丁堰街道]\n"), encoding="utf-8"
    )
    result = project.dispatch("validate", str(own))
    assert result.returncode == 0, result.stderr


def test_a_department_targeting_another_departments_group_is_refused_unless_that_one_co_owns(
    project: Project,
) -> None:
    path = project.write("campaigns/drill.yaml", _campaign("经济发展局", "  segments: [accountants, retirees]\n"))
    match = _one_line(project.dispatch("validate", str(path)))
    assert match["field"] == "audience.segments.1", match.group(0)
    assert "社会保障局's group" in match["message"] and "co_owners" in match["message"]

    path.write_text(
        _campaign("经济发展局", "  segments: [accountants, retirees]\n", "co_owners: [社会保障局]\n"), encoding="utf-8"
    )
    result = project.dispatch("validate", str(path))
    assert result.returncode == 0, result.stderr

    path.write_text(_campaign("宣传部", "  segments: [retirees]\n"), encoding="utf-8")
    match = _one_line(project.dispatch("validate", str(path)))
    assert match["field"] == "owner" and "political_legal (政法和应急管理局)" in match["message"]
    assert "lucheng (潞城街道)" in match["message"], "towns and streets may own campaigns"


def test_the_new_departments_and_groups_can_own_and_be_targeted_by_campaigns(project: Project) -> None:
    cases = {
        "law": ("综合执法局", "  segments: [shopkeepers]\n"),
        "legal": ("政法和应急管理局", "  districts: all\n"),
        "court": ("法院", "  districts: [henglin]\n"),
        "liaison": ("公安分局", "  segments: [反电诈联络员（一企一员）]\n"),
        "clinic": ("社会事业局", "  segments: [patients, students]\n"),
        "teens": ("党群工作部", "  segments: [青少年, women]\n"),
    }
    for name, (owner, audience) in cases.items():
        project.write(f"drills/{name}.yaml", _campaign(owner, audience).replace("id: drill", f"id: {name}"))
    result = project.dispatch("validate", "drills")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok drills/") == len(cases)

    # the synthetic registry draws the new groups and the police grids' 网格
    csv_path = project.registry(size=400, seed=7)
    text = csv_path.read_text(encoding="utf-8")
    for group in ("teenagers", "patients", "shopkeepers", "liaisons"):
        assert group in text, group
    assert "youth" not in text
    preview = project.dispatch("preview", "drills/teens.yaml", "--json")
    assert preview.returncode == 0, preview.stderr
    assert json.loads(preview.stdout)["recipients"] > 0


def test_the_registry_stays_byte_for_byte_the_same_for_a_seed(project: Project) -> None:
    a = project.dispatch("audience", "generate", "--size", "500", "--seed", "2021")
    b = project.dispatch("audience", "generate", "--size", "500", "--seed", "2021")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_a_broken_organisation_yaml_is_one_line_naming_file_line_and_field_exit_2(project: Project) -> None:
    org = project.root / "organisation.yaml"
    lines = org.read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if "id: enterprise_owners" in line)
    lines[index] = lines[index].replace("registry: {working: 0.06}", "registry: {workers: 0.06}")
    org.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for command in (("validate",), ("audience", "generate", "--size", "5"), ("preview", PLAN_CAMPAIGN)):
        match = _one_line(project.dispatch(*command))
        assert match["path"] == "organisation.yaml" and match["line"] == str(index + 1), match.group(0)
        assert match["field"].endswith("registry.workers") and "unknown life stage" in match["message"]

    org.write_text(org.read_text(encoding="utf-8").replace("grid_prefix: LC", "grid_prefx: LC"), encoding="utf-8")
    match = _one_line(project.dispatch("validate"))
    assert match["message"] == "unknown field (check its spelling)", match.group(0)

    org.write_text("departments: &d [a]\nassessed_by: *d\n", encoding="utf-8")
    match = _one_line(project.dispatch("validate"))
    assert match["line"] == "1" and "anchors" in match["message"], match.group(0)


def test_themes_differ_by_year_and_a_template_reused_by_accident_is_refused(project: Project) -> None:
    loaded = load_campaign(project.root / PLAN_CAMPAIGN, project.root / "templates", datetime(2026, 1, 1, tzinfo=UTC))
    picks = [loaded.template_for(datetime(year, 7, 5, 10, tzinfo=SHANGHAI)) for year in (2021, 2022, 2023)]
    assert len(set(picks)) == 3, picks
    texts = {loaded.templates[name].text for name in loaded.template_names()}
    assert len(texts) == 12, "every quarter of the plan sends its own text"
    # the quarter is local: 1 April 00:30 in Shanghai is still 31 March in UTC
    assert loaded.template_for(datetime(2022, 4, 1, 0, 30, tzinfo=SHANGHAI)) == "themes/2022/credit_record.sms.j2"

    themes = project.root / "themes.yaml"
    text = themes.read_text(encoding="utf-8")
    themes.write_text(text.replace("themes/2023/fan_gaming.sms.j2", "themes/investment.sms.j2"), encoding="utf-8")
    match = _one_line(project.dispatch("validate"))
    assert match["path"] == "themes.yaml" and match["field"] == "plans.0.themes.2023-Q3.template", match.group(0)
    assert "already the theme of 2021-Q3" in match["message"]
    themes.write_text(
        text.replace("template: themes/2023/fan_gaming.sms.j2}", "template: themes/investment.sms.j2, repeat: true}"),
        encoding="utf-8",
    )
    result = project.dispatch("validate")
    assert result.returncode == 0, result.stderr


def test_schedule_list_shows_the_theme_of_each_fire_and_nothing_after_the_plan(project: Project) -> None:
    result = project.dispatch("schedule", "list", "--from", "2022-01-01", "--count", "20", "--json")
    assert result.returncode == 0, result.stderr
    item = next(c for c in json.loads(result.stdout)["campaigns"] if c["campaign_id"] == "plan-2021-2023-themes")
    fires = [(f["fire_time"][:10], f["theme"]) for f in item["fires"]]
    assert len(fires) == 8 and fires[0] == ("2022-01-05", "网络游戏虚假交易诈骗（寒假）")
    assert fires[-1] == ("2023-10-05", "AI换脸拟声诈骗")
    human = project.dispatch("schedule", "list", "--from", "2023-07-01", "--count", "3")
    assert "2023-07-05T10:00:00+08:00  themes/2023/fan_gaming.sms.j2  针对学生的追星、游戏诈骗（暑假）" in human.stdout


def test_a_schedule_reaching_outside_the_plan_period_is_refused(project: Project) -> None:
    base = (project.root / PLAN_CAMPAIGN).read_text(encoding="utf-8").replace("id: plan-2021-2023-themes", "id: drill")
    for bounds, field, words in (
        ("  start: 2020-10-01\n", "schedule.start", "before plan plan-2021-2023 does"),
        ("  end: 2024-06-30\n", "schedule.end", "after plan plan-2021-2023 does"),
    ):
        path = project.write("campaigns/drill.yaml", base + bounds)
        match = _one_line(project.dispatch("validate", str(path)))
        assert match["field"] == field and words in match["message"], match.group(0)
    path = project.write("campaigns/drill.yaml", base + "  start: 2022-01-01\n  end: 2023-06-30\n")
    assert project.dispatch("validate", str(path)).returncode == 0


def test_the_scheduler_never_fires_a_plan_campaign_outside_the_plan(project: Project) -> None:
    rt = project.runtime()
    scheduler = Scheduler(rt, project.root / "campaigns", lease=_AlwaysLeader())
    scheduler.load(strict=True)
    entry = next(e for e in scheduler.entries.values() if e.loaded.campaign.id == "plan-2021-2023-themes")
    last = datetime(2023, 10, 5, 10, tzinfo=SHANGHAI).astimezone(UTC)
    assert next_after(entry.trigger, last - timedelta(seconds=1)) == last
    assert next_after(entry.trigger, last) is None, "no fire after the plan's last day"
    assert next_after(make_trigger(entry.loaded.campaign.schedule), last) is not None  # the bare schedule would
    assert upcoming_fires([entry.loaded], datetime(2024, 1, 1, tzinfo=UTC), None, 5)[0]["fires"] == []
    # and a tick now (2026) creates no run of it
    scheduler.tick()
    assert rt.store.list_runs(campaign_id="plan-2021-2023-themes") == []


class _AlwaysLeader:
    def hold(self) -> bool:
        return True

    def release(self) -> None:
        pass


def test_a_run_outside_the_plan_is_refused_and_made_up_with_as_of_a_date_inside(project: Project) -> None:
    match = _one_line(project.dispatch("run", PLAN_CAMPAIGN))
    assert match["field"] == "plan" and "outside plan plan-2021-2023" in match["message"], match.group(0)
    assert "--as-of" in match["message"]
    match = _one_line(project.dispatch("run", PLAN_CAMPAIGN, "--as-of", "2024-01-05"))
    assert match["message"].startswith("--as-of 2024-01-05 is outside plan plan-2021-2023"), match.group(0)
    assert not project.outbox.exists()

    project.registry(size=60, seed=3)
    dry = project.dispatch("run", PLAN_CAMPAIGN, "--dry-run", "--as-of", "2023-01-05")
    assert dry.returncode == 0 and "template themes/2023/screen_sharing.sms.j2 (屏幕共享诈骗)" in dry.stdout
    made_up = project.dispatch("run", PLAN_CAMPAIGN, "--as-of", "2022-07-05", "--json")
    assert made_up.returncode == 0, made_up.stderr
    st = json.loads(made_up.stdout)
    assert st["template"] == "themes/2022/romance_investment.sms.j2" and st["open"] == 0
    # the assessment counts the made-up fire in the quarter it stands for
    report = json.loads(project.dispatch("report", "coverage", "--period", "2022Q3", "--json").stdout)
    assert report["runs"] == 1
    deps = json.loads(project.dispatch("report", "departments", "--year", "2022", "--json").stdout)
    assert deps["assessed_by"] == {"department": "political_legal", "name": "政法和应急管理局"}
    assert {d["department"]: d["runs"] for d in deps["departments"]}["police"] == 1


def test_campaigns_without_a_plan_are_not_bounded_by_it(project: Project) -> None:
    path: Path = project.root / "campaigns/quarterly-themes.yaml"
    loaded = load_campaign(path, project.root / "templates")
    assert loaded.plan is None and loaded.schedule == loaded.campaign.schedule
