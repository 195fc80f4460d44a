"""What a newcomer hits in their first hour, run as they run it: the installed command, a project
folder, only documented settings.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from acceptance_support import copy_project, daytime_now, dispatch, ok, person_env
from rich.cells import cell_len


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = copy_project(tmp_path / "project")
    env = person_env(DISPATCH_FAKE_NOW=daytime_now())
    ok(dispatch(root, "audience", "generate", "--size", "600", "--seed", "8", "--output", "var/r.csv", env=env))
    ok(dispatch(root, "audience", "import", "var/r.csv", env=env))
    return root, env


def test_commands_find_the_project_from_a_subfolder(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    inside = root / "campaigns"
    # a campaign named from inside campaigns/ still finds templates/ and the project's delivery log
    ok(dispatch(inside, "validate", "quarterly-themes.yaml", env=env))
    run_id = ok(dispatch(inside, "run", "refund-scam-lucheng.yaml", env=env)).stdout.strip()
    listed = json.loads(ok(dispatch(root, "runs", "--json", env=env)).stdout)["runs"]
    assert [r["run_id"] for r in listed] == [run_id]
    assert not (inside / "var").exists(), "no second delivery log beside the campaigns"
    assert (root / "var" / "outbox.jsonl").is_file()


def _refused(result: object, field: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr  # type: ignore[attr-defined]
    assert f": {field}: " in lines[0], lines[0]
    return str(lines[0])


def test_a_run_past_send_by_or_with_nobody_to_send_to_is_refused_and_writes_nothing(
    project: tuple[Path, dict[str, str]],
) -> None:
    root, env = project
    base = (root / "campaigns" / "refund-scam-lucheng.yaml").read_text(encoding="utf-8")
    (root / "campaigns" / "late.yaml").write_text(
        base.replace("id: refund-scam-lucheng", "id: late") + "send_by: 2024-01-31\n", encoding="utf-8"
    )
    line = _refused(dispatch(root, "run", "campaigns/late.yaml", env=env), "send_by")
    assert line.startswith("campaigns/late.yaml:") and "has passed" in line

    nobody = base.replace("id: refund-scam-lucheng", "id: nobody").replace(
        "exclude_segments: [students]", "segments: [students]\n  exclude_segments: [students]"
    )
    (root / "campaigns" / "nobody.yaml").write_text(nobody, encoding="utf-8")
    assert "no resident matches" in _refused(dispatch(root, "run", "campaigns/nobody.yaml", env=env), "audience")

    assert json.loads(ok(dispatch(root, "runs", "--json", env=env)).stdout)["runs"] == []
    assert not (root / "var" / "outbox.jsonl").exists()


def test_audit_log_fits_80_columns_with_district_names(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    run_id = ok(dispatch(root, "run", "campaigns/refund-scam-lucheng.yaml", env=env)).stdout.strip()
    table = ok(dispatch(root, "audit", "log", "--run", run_id, "--state", "sent", "--limit", "20", env=env)).stdout
    lines = table.splitlines()
    assert lines[0].startswith(f"run {run_id}, ")
    assert len(lines) == 2 + 20  # heading, column names, the events
    assert all(cell_len(line) <= 80 for line in lines), max(lines, key=cell_len)
    assert any("潞城街道" in line or "丁堰街道" in line for line in lines[2:])
    assert all("…" not in line.split()[1] for line in lines[2:]), "the masked number is shown whole"


def test_report_coverage_defaults_to_the_current_quarter(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    ok(dispatch(root, "run", "campaigns/refund-scam-lucheng.yaml", env=env))
    report = json.loads(ok(dispatch(root, "report", "coverage", "--json", env=env)).stdout)
    now = datetime.fromisoformat(env["DISPATCH_FAKE_NOW"]).astimezone(ZoneInfo("Asia/Shanghai"))
    assert report["period"] == f"{now.year}Q{(now.month - 1) // 3 + 1}"
    assert report["runs"] == 1


def test_preview_shows_the_audience_per_district_and_grid(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    preview = json.loads(ok(dispatch(root, "preview", "campaigns/refund-scam-lucheng.yaml", "--json", env=env)).stdout)
    grids = preview["by_district_grid"]
    assert set(grids) == {"lucheng", "dingyan"}
    assert sum(sum(g.values()) for g in grids.values()) == preview["recipients"]
    assert all(code.startswith(("LC-", "DY-")) for g in grids.values() for code in g)
    human = ok(dispatch(root, "preview", "campaigns/refund-scam-lucheng.yaml", env=env)).stdout
    lucheng = next(line for line in human.splitlines() if line.startswith("潞城街道 "))
    assert f"潞城街道 {sum(grids['lucheng'].values())} in {len(grids['lucheng'])} grid(s)" in lucheng
