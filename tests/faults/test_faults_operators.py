"""Two operators racing: the same campaign started twice at once messages nobody twice."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import Project
from tests.faults.support import CAMPAIGN, PrivatePostgres, check_recovery

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def racing_project(request: pytest.FixtureRequest, sqlite_project: Project) -> Project:
    if request.param == "postgresql":
        pg: PrivatePostgres = request.getfixturevalue("private_postgres")
        if not pg.running():
            pg.start()
        sqlite_project.env["DISPATCH_DATABASE_URL"] = pg.new_database()
    return sqlite_project


def test_two_manual_runs_of_one_campaign_at_once_create_one_run_and_the_second_needs_again(
    racing_project: Project,
) -> None:
    project = racing_project
    project.registry(size=500, seed=81)
    procs = [project.popen("run", CAMPAIGN, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, err[-500:]) for p, (_, err) in zip(procs, outs, strict=True)]
    refused = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert "--again --reason" in refused.strip().splitlines()[-1]
    runs = project.runtime().store.list_runs(campaign_id="quarterly-themes")
    assert len(runs) == 1
    check_recovery(project, runs[0].id)
    # a deliberate repeat, with the operator's reason on the ledger
    assert project.dispatch("run", CAMPAIGN, "--again").returncode == 2
    again = project.dispatch("run", CAMPAIGN, "--again", "--reason", "drill: resend after carrier outage", "--json")
    assert again.returncode == 0, again.stderr[-1000:]
    run_id = json.loads(again.stdout)["run_id"]
    head = project.dispatch("audit", "log", "--run", run_id, "--format", "jsonl")
    assert head.returncode == 0
    check_recovery(project, run_id)
    import sqlalchemy as sa

    from dispatcher.store import schema as t

    with project.runtime().store.engine.connect() as conn:
        payload = conn.execute(
            sa.select(t.events.c.payload).where(
                t.events.c.run_id == run_id, t.events.c.batch.is_(None), t.events.c.seq == 0
            )
        ).scalar_one()
    assert json.loads(payload)["again_reason"] == "drill: resend after carrier outage"
