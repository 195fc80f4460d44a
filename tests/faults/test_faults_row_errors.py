"""Any exception for one row inside a batch becomes that row's outcome; the batch goes on."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Project
from tests.faults.support import check_recovery

pytestmark = pytest.mark.slow

# the divisor is 0 for grid NN-10 only: every other grid renders
CAMPAIGN = """\
id: grid-quota
title: 网格反诈提醒
owner: 公安分局
channel: sms
template: grid-quota.sms.j2
audience:
  districts: all
"""
TEMPLATE = "{{ recipient.name }}您好：本网格每{{ 60 // ((recipient.grid[-2:] | int) - 10) }}户设一名反诈联络员。\n"


def test_a_template_that_raises_for_one_grid_fails_those_rows_and_sends_everyone_else(
    sqlite_project: Project,
) -> None:
    project = sqlite_project
    project.registry(size=600, seed=41)
    project.write("campaigns/grid-quota.yaml", CAMPAIGN)
    project.write("templates/grid-quota.sms.j2", TEMPLATE)
    result = project.dispatch("run", "campaigns/grid-quota.yaml", "--json", timeout=120)
    st = json.loads(result.stdout)
    rows = list(project.runtime().store.deliveries(st["run_id"]))
    broken = [r for r in rows if r.grid.endswith("-10") and r.reason != "opted_out"]
    assert broken, "the registry must have residents in a grid NN-10 for this test to mean anything"
    assert {r.state for r in broken} == {"failed"}
    assert {r.error_code for r in broken} == {"render_error"}
    assert all("ZeroDivisionError" in r.error_message and "+86" not in r.error_message for r in broken)
    assert st["counts"].get("sending", 0) == 0 and st["counts"].get("pending", 0) == 0
    assert st["status"] == "completed", st
    assert result.returncode == 0, result.stderr
    eligible = {r.key for r in rows if r.reason != "opted_out" and not r.grid.endswith("-10")}
    check_recovery(project, st["run_id"], expected=eligible)
    # each failure is on the ledger, with its code
    log = project.dispatch("audit", "log", "--run", st["run_id"], "--state", "failed", "--format", "jsonl")
    assert log.returncode == 0, log.stderr
    events = [json.loads(line) for line in log.stdout.splitlines() if line.strip()]
    assert len(events) == len(broken) and {e["error_code"] for e in events} == {"render_error"}


def test_a_gateway_adapter_raising_something_unexpected_leaves_no_row_sending(sqlite_project: Project) -> None:
    """An adapter bug answers `unknown` (code internal_error) for the messages of that call: it cannot
    say whether they left, so they are looked up before any resend; the batch itself carries on."""
    from dispatcher.campaigns import load_campaign
    from dispatcher.providers.outbox.gateway import OutboxGateway
    from dispatcher.runs import audience_filter, run_spec
    from dispatcher.sender import process_batch

    project = sqlite_project
    project.registry(size=80, seed=43)

    class BrokenAdapter(OutboxGateway):
        """An adapter with a bug: a KeyError for one number, as a third-party SDK might raise."""

        bad: str = ""

        def send_many(self, messages):  # type: ignore[no-untyped-def]
            if any(m.to == self.bad for m in messages):
                raise KeyError("sid")
            return super().send_many(messages)

    rt = project.runtime(gateway_factory=lambda s: BrokenAdapter(s.outbox_path))
    loaded = load_campaign(project.root / "campaigns/quarterly-themes.yaml", project.root / "templates")
    spec = run_spec(rt, loaded)
    rt.store.create_run(spec, audience_filter(loaded))
    rows = list(rt.store.deliveries(spec.run_id))
    BrokenAdapter.bad = next(r.phone for r in rows if r.reason != "opted_out")
    result = process_batch(rt, spec.run_id, 0)
    counts = rt.store.counts(spec.run_id)
    assert counts.get("sending", 0) == 0 and counts.get("pending", 0) == 0, counts
    assert result.counts.get("unknown", 0) >= 1 and result.counts.get("sent", 0) >= 1
    unknown = [r for r in rt.store.deliveries(spec.run_id) if r.state == "unknown"]
    assert {r.error_code for r in unknown} == {"internal_error"}
    assert all("KeyError" in r.error_message for r in unknown)
