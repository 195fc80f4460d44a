"""Every campaign file we ship goes through what an operator does with it, as the operator does it:
validate, preview, a dry run, the run, its status and the audit — the installed `dispatch` command,
in a project folder, with only documented settings. The figures of each step must agree.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from acceptance_support import REPO, copy_project, daytime_now, dispatch, ok, person_env

SHIPPED = sorted((REPO / "campaigns").glob("*.yaml"))


def _send_by_passed(campaign: Path, now: datetime) -> bool:
    send_by = yaml.safe_load(campaign.read_text(encoding="utf-8")).get("send_by")
    if send_by is None:
        return False
    if isinstance(send_by, date) and not isinstance(send_by, datetime):
        # a date means the end of that day in Shanghai
        send_by = datetime(send_by.year, send_by.month, send_by.day, 23, 59, 59, tzinfo=ZoneInfo("Asia/Shanghai"))
    return bool(send_by <= now)


def _as_of_for_plan(campaign: Path, now: datetime) -> list[str]:
    """``--as-of`` the last quarter's fire date of the campaign's plan when today is outside it, else nothing.

    A campaign of a plan (themes.yaml) is run as an operator would once the plan is over: making up a fire.
    """
    plan_id = yaml.safe_load(campaign.read_text(encoding="utf-8")).get("plan")
    if plan_id is None:
        return []
    plans = yaml.safe_load((REPO / "themes.yaml").read_text(encoding="utf-8"))["plans"]
    plan = next(p for p in plans if p["id"] == plan_id)
    if plan["start"] <= now.date() <= plan["end"]:
        return []
    return ["--as-of", f"{plan['end'].year}-10-05"]


def test_the_shipped_campaigns_are_the_ones_this_layer_runs() -> None:
    assert len(SHIPPED) >= 5, "campaigns/ lost its shipped campaigns"


@pytest.mark.parametrize("campaign", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_campaign_validates_previews_dry_runs_runs_and_audits_with_agreeing_figures(
    campaign: Path, tmp_path: Path
) -> None:
    root = copy_project(tmp_path / "project")
    fake_now = daytime_now()
    env = person_env(DISPATCH_FAKE_NOW=fake_now)  # a drill at 10:00 Shanghai time, as `make demo` does at night
    rel = f"campaigns/{campaign.name}"
    ok(dispatch(root, "audience", "generate", "--size", "1200", "--seed", "11", "--output", "var/residents.csv",
                env=env))  # fmt: skip
    ok(dispatch(root, "audience", "import", "var/residents.csv", env=env))

    validated = ok(dispatch(root, "validate", rel, env=env))
    assert validated.stdout.startswith(f"ok {rel}"), validated.stdout

    preview = json.loads(ok(dispatch(root, "preview", rel, "--json", env=env)).stdout)
    assert preview["recipients"] > 0, f"{campaign.name} selects nobody from a 1,200-resident registry"
    # the human preview too: it is what the operator reads
    human = ok(dispatch(root, "preview", rel, env=env)).stdout
    assert f"recipients {preview['recipients']}" in human

    as_of = _as_of_for_plan(campaign, datetime.fromisoformat(fake_now))
    if as_of:  # outside its plan's period: refused in one line, then made up as of a date of the plan
        refused = dispatch(root, "run", rel, "--dry-run", env=env)
        assert refused.returncode == 2 and "plan" in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    dry = json.loads(ok(dispatch(root, "run", rel, "--dry-run", "--json", *as_of, env=env)).stdout)
    assert dry["recipients"] == preview["recipients"]
    assert dry["parts"] == preview["total_parts"]
    assert dry["skipped"] == preview["opted_out"]

    if _send_by_passed(campaign, datetime.fromisoformat(fake_now)):
        refused = dispatch(root, "run", rel, env=env)
        assert refused.returncode == 2 and "send_by" in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        return

    run = ok(dispatch(root, "run", rel, *as_of, env=env))
    run_id = run.stdout.strip()
    assert "\n" not in run_id and run_id, f"the run id alone on standard output, got {run.stdout!r}"

    status = json.loads(ok(dispatch(root, "status", run_id, "--json", env=env)).stdout)
    counts = status["counts"]
    eligible = status["total"] - counts.get("skipped", 0)
    assert eligible == preview["recipients"] == dry["recipients"]
    assert counts.get("sent", 0) == eligible and status["open"] == 0 and status["status"] == "completed"
    assert status["parts_sent"] == dry["parts"]
    outbox = (root / "var" / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(outbox) == eligible, "one outbox line per eligible recipient"

    newest = json.loads(ok(dispatch(root, "status", "--json", env=env)).stdout)
    assert newest["run_id"] == run_id, "`dispatch status` with no run shows the newest run"
    verify = ok(dispatch(root, "audit", "verify", env=env))
    assert f"ok {run_id}" in verify.stdout
