"""`grids` in a campaign narrow only their own district: the other selected districts are taken whole."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from tests.conftest import Project

CAMPAIGN = """\
id: grid-drill
title: 网格演练
owner: 公安分局
template: themes/refund.sms.j2
variables:
  hotline: "96110"
audience:
  districts: [横林镇, 遥观镇, lucheng]
  grids: [hl-03, HL-07, LC-01]
"""


def _expected(csv_path: Path) -> tuple[Counter[str], Counter[str], Counter[tuple[str, str]]]:
    """Recipients and opted-out residents per district, and recipients per grid, counted from the registry file."""
    narrowed = {"横林镇": {"HL-03", "HL-07"}, "潞城街道": {"LC-01"}}
    ids = {"横林镇": "henglin", "遥观镇": "yaoguan", "潞城街道": "lucheng"}
    recipients: Counter[str] = Counter()
    opted_out: Counter[str] = Counter()
    per_grid: Counter[tuple[str, str]] = Counter()
    with open(csv_path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            district = row["district"]
            if district not in ids or (district in narrowed and row["grid"] not in narrowed[district]):
                continue
            if row["opted_out"] == "true":
                opted_out[ids[district]] += 1
            else:
                recipients[ids[district]] += 1
                per_grid[(ids[district], row["grid"])] += 1
    return recipients, opted_out, per_grid


def test_a_listed_grid_narrows_only_its_own_district(project: Project) -> None:
    csv_path = project.registry(size=2000, seed=11)
    recipients, opted_out, per_grid = _expected(csv_path)
    assert recipients["yaoguan"] > 100 and 0 < recipients["henglin"] < 150 and 0 < recipients["lucheng"] < 60

    path = project.write("campaigns/grid-drill.yaml", CAMPAIGN)
    preview = project.dispatch("preview", str(path), "--json")
    assert preview.returncode == 0, preview.stderr
    shown = json.loads(preview.stdout)["by_district_grid"]
    assert {(d, g): n for d, grids in shown.items() for g, n in grids.items()} == dict(per_grid)
    assert len(shown["yaoguan"]) == 12 and set(shown["henglin"]) == {"HL-03", "HL-07"}
    dry = project.dispatch("run", str(path), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout)
    assert {d: b["recipients"] for d, b in summary["by_district"].items()} == dict(recipients)
    assert sum(b["skipped"] for b in summary["by_district"].values()) == sum(opted_out.values())

    run = project.dispatch("run", str(path), "--json")
    assert run.returncode == 0, run.stderr
    st = json.loads(run.stdout)
    assert st["total"] == sum(recipients.values()) + sum(opted_out.values())
    sent = Counter(json.loads(line)["key"] for line in project.outbox.read_text(encoding="utf-8").splitlines())
    assert len(sent) == sum(recipients.values())
