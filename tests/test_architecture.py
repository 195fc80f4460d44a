"""The walls of the code base: layers without cycles, one key format, one parse of a run's snapshot."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from dispatcher.batch import context_from_run, run_campaign
from dispatcher.keys import delivery_key
from dispatcher.runs import settle_keys
from tests.conftest import ROOT, Project

CAMPAIGN = "campaigns/quarterly-themes.yaml"


def test_import_contracts_hold_layers_and_no_cycles() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_runs_keys_are_run_colon_phone_and_its_snapshot_is_parsed_once(project: Project) -> None:
    project.registry(size=40, seed=3)
    result = project.dispatch("run", CAMPAIGN, "--json")
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    store = project.runtime().store
    rows = list(store.deliveries(run_id))
    assert rows and all(r.key == delivery_key(run_id, r.phone) == f"{run_id}:{r.phone}" for r in rows)
    # an operator types a number the local way; settle finds the same row's key
    assert settle_keys(run_id, [rows[0].phone.removeprefix("+86")]) == [rows[0].key]

    # every reader of the run (worker, sweeps, TwiML, CLI) gets the one parsed campaign
    run = store.get_run(run_id)
    campaign = run_campaign(run)
    assert run_campaign(store.get_run(run_id)) is campaign
    assert context_from_run(run).campaign is campaign
    assert campaign.id == run.campaign_id
    # another snapshot (another run, or another text) is parsed on its own
    other = dataclasses.replace(run, id=run_id + "-other")
    assert run_campaign(other) is not campaign and run_campaign(other).id == campaign.id
