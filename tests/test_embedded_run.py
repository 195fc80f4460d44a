"""A campaign run end to end on the embedded defaults: in-memory broker, outbox, SQLite."""

from __future__ import annotations

import collections
import hashlib
import json

from dispatcher.providers.outbox.gateway import read_outbox
from dispatcher.runtime import Runtime
from dispatcher.sender import process_batch
from dispatcher.sms import segment
from tests.conftest import Project

CAMPAIGN = "campaigns/quarterly-themes.yaml"


def _status(project: Project, run_id: str) -> dict:  # type: ignore[type-arg]
    result = project.dispatch("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_run_sends_every_eligible_resident_exactly_once_and_the_log_agrees(project: Project) -> None:
    project.registry(size=1200, seed=5)
    result = project.dispatch("run", CAMPAIGN, "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert st["status"] == "completed" and st["open"] == 0
    lines = list(read_outbox(project.outbox))
    keys = collections.Counter(line["key"] for line in lines)
    assert max(keys.values()) == 1
    rows = list(project.runtime().store.deliveries(st["run_id"]))
    assert len(rows) == st["total"] == 1200
    sent = {r.key for r in rows if r.state == "sent"}
    assert sent == set(keys)
    assert st["counts"] == {"sent": len(sent), "skipped": 1200 - len(sent)}
    assert all(r.reason == "opted_out" for r in rows if r.state == "skipped")
    assert sum(sum(c.values()) for c in st["by_district"].values()) == 1200
    for line in lines[:50]:
        assert line["body"].startswith("【常州经开区反诈中心】") and line["body"].endswith("回T退订")
        assert line["parts"] == segment(line["body"]).parts
        assert line["to"].startswith("+86")
    assert st["parts_sent"] == sum(line["parts"] for line in lines)


def test_run_snapshots_campaign_and_template_with_sha256(project: Project) -> None:
    project.registry(size=50)
    st = json.loads(project.dispatch("run", CAMPAIGN, "--json").stdout)
    run = project.runtime().store.get_run(st["run_id"])
    campaign_text = (project.root / CAMPAIGN).read_text(encoding="utf-8")
    template_text = (project.root / "templates" / run.template_name).read_text(encoding="utf-8")
    assert run.campaign_yaml == campaign_text
    assert run.campaign_sha256 == hashlib.sha256(campaign_text.encode()).hexdigest()
    assert run.template_sha256 == hashlib.sha256(template_text.encode()).hexdigest() == st["template_sha256"]
    # editing the template afterwards does not change what the run sends
    (project.root / "templates" / run.template_name).write_text("改过的模板 {{ hotline }}", encoding="utf-8")
    assert project.runtime().store.get_run(st["run_id"]).template_text == template_text


def test_dry_run_renders_but_writes_and_sends_nothing(project: Project) -> None:
    project.registry(size=300)
    result = project.dispatch("run", CAMPAIGN, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True and summary["recipients"] + summary["skipped"] == 300
    assert summary["parts"] >= summary["recipients"]
    assert not project.outbox.exists()
    assert json.loads(project.dispatch("runs", "--json").stdout) == {"runs": []}


def test_preview_counts_the_audience_and_shows_every_variant(project: Project) -> None:
    project.registry(size=400, seed=3)
    result = project.dispatch("preview", CAMPAIGN, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["variants"]) == 4
    assert all(v["encoding"] == "UCS-2" and v["parts"] >= 2 for v in report["variants"])
    assert report["recipients"] + report["opted_out"] == 400
    assert report["total_parts"] >= report["recipients"]
    assert not project.outbox.exists()


def test_permanent_gateway_failure_fails_the_row_after_one_attempt(project: Project) -> None:
    project.write(
        "var/r.csv",
        "phone,name,district,grid,segments,language,opted_out\n"
        "13800000001,甲,横林镇,HL-01,workers,zh-CN,false\n"
        "13800000002,乙,横林镇,HL-01,workers,zh-CN,false\n",
    )
    assert project.dispatch("audience", "import", "var/r.csv").returncode == 0
    result = project.dispatch("run", CAMPAIGN, "--json", env={"DISPATCH_OUTBOX_FAIL_PERMANENT": "+8613800000002"})
    st = json.loads(result.stdout)
    assert st["counts"] == {"sent": 1, "failed": 1}
    rt = project.runtime()
    failed = next(r for r in rt.store.deliveries(st["run_id"]) if r.state == "failed")
    assert failed.error_code == "outbox.rejected" and failed.attempts == 1
    assert [line["to"] for line in read_outbox(project.outbox)] == ["+8613800000001"]


def test_transient_failure_is_retried_then_fails_when_attempts_run_out(project: Project) -> None:
    project.write(
        "var/r.csv",
        "phone,name,district,grid,segments,language,opted_out\n13800000001,甲,横林镇,HL-01,workers,zh-CN,false\n",
    )
    assert project.dispatch("audience", "import", "var/r.csv").returncode == 0
    result = project.dispatch(
        "run",
        CAMPAIGN,
        "--json",
        env={"DISPATCH_OUTBOX_FAIL_TRANSIENT": "+8613800000001", "DISPATCH_MAX_ATTEMPTS": "2"},
    )
    st = json.loads(result.stdout)
    assert st["counts"] == {"failed": 1}
    rt = project.runtime()
    row = next(rt.store.deliveries(st["run_id"]))
    assert (row.attempts, row.reason, row.error_code) == (2, "attempts_exhausted", "outbox.busy")
    assert [a.outcome for a in rt.store.attempts_for(row.id)] == ["retry", "failed"]
    assert not project.outbox.exists() or not list(read_outbox(project.outbox))


def test_every_batch_message_delivered_twice_at_once_sends_nobody_twice(project: Project) -> None:
    """Dramatiq delivers at least once: each of several batches is processed by two threads at the
    same moment, as two workers would after a redelivery; the claim lets exactly one of them send."""
    import os
    import threading

    project.registry(size=240)
    from dispatcher.campaigns import load_campaign
    from dispatcher.runs import audience_filter, run_spec

    rt = Runtime(project.settings(DISPATCH_BATCH_SIZE="40"))  # several small batches
    project.runtimes.append(rt)
    loaded = load_campaign(project.root / CAMPAIGN, project.root / "templates")
    spec = run_spec(rt, loaded)
    created = rt.store.create_run(spec, audience_filter(loaded))
    assert created.batches >= 5
    claimed: dict[int, list[int]] = collections.defaultdict(list)
    cwd = os.getcwd()
    os.chdir(project.root)
    try:
        for batch_no in range(created.batches):
            gate = threading.Barrier(2)

            def twice(batch_no: int = batch_no, gate: threading.Barrier = gate) -> None:
                gate.wait()
                claimed[batch_no].append(process_batch(rt, spec.run_id, batch_no).claimed)

            threads = [threading.Thread(target=twice) for _ in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
    finally:
        os.chdir(cwd)
    assert sum(sum(c) for c in claimed.values()) == created.pending
    keys = collections.Counter(line["key"] for line in read_outbox(project.outbox))
    assert len(keys) == created.pending and max(keys.values()) == 1
    sent = {r.key for r in rt.store.deliveries(spec.run_id) if r.state == "sent"}
    assert sent == set(keys)


def test_a_resident_who_opts_out_after_the_run_is_created_is_skipped_not_sent(project: Project) -> None:
    """STOP can arrive between the run's creation and the moment the worker reaches that batch."""
    csv_path = project.registry(size=50, seed=3)
    from dispatcher.campaigns import load_campaign
    from dispatcher.runs import audience_filter, run_spec

    rt = project.runtime()
    loaded = load_campaign(project.root / CAMPAIGN, project.root / "templates")
    spec = run_spec(rt, loaded)
    rt.store.create_run(spec, audience_filter(loaded))
    pending = [r for r in rt.store.deliveries(spec.run_id) if r.state == "pending"]
    late = pending[len(pending) // 2].phone
    assert late.lstrip("+86") in csv_path.read_text(encoding="utf-8")
    assert rt.store.set_opted_out(late, True)  # as the inbound webhook records a STOP reply
    result = project.dispatch("resume", spec.run_id, "--json")
    assert result.returncode == 0, result.stderr
    rows = {r.phone: r for r in rt.store.deliveries(spec.run_id)}
    assert (rows[late].state, rows[late].reason) == ("skipped", "opted_out")
    sent_to = {line["to"] for line in read_outbox(project.outbox)}
    assert late not in sent_to and len(sent_to) == len(pending) - 1


def test_resume_after_a_crash_sends_only_what_the_gateway_never_got(project: Project) -> None:
    """A worker died after handing some messages to the gateway but before recording them."""
    project.registry(size=60)
    from dispatcher.campaigns import load_campaign
    from dispatcher.providers.base import OutgoingMessage
    from dispatcher.runs import audience_filter, run_spec

    rt = project.runtime()
    loaded = load_campaign(project.root / CAMPAIGN, project.root / "templates")
    spec = run_spec(rt, loaded)
    rt.store.create_run(spec, audience_filter(loaded))
    claimed = rt.store.claim(spec.run_id, 0, "worker-that-died")
    handed_over = claimed[:20]
    for row in handed_over:  # the gateway got these; the crash lost the record of it
        rt.gateway.send(OutgoingMessage(row.key, spec.run_id, spec.campaign_id, row.phone, "x", 1, "GSM-7"))
    result = project.dispatch("resume", spec.run_id, "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert st["resume"] == {"orphans": len(claimed), "already_sent": 20, "requeued": len(claimed) - 20, "batches": 1}
    assert st["open"] == 0
    keys = collections.Counter(line["key"] for line in read_outbox(project.outbox))
    assert max(keys.values()) == 1
    assert set(keys) == {r.key for r in rt.store.deliveries(spec.run_id) if r.state == "sent"}


def test_unknown_run_id_is_a_clear_input_error(project: Project) -> None:
    for command in (("status", "nope"), ("resume", "nope")):
        result = project.dispatch(*command)
        assert result.returncode == 2
        assert result.stderr.strip() == "run: no run with id 'nope' (see `dispatch runs`)"


def test_worker_without_a_broker_url_explains_itself(project: Project) -> None:
    result = project.dispatch("worker")
    assert result.returncode == 2 and "DISPATCH_BROKER_URL" in result.stderr and "Traceback" not in result.stderr


def _run_with_unknown_rows(project: Project, n: int) -> tuple[str, list[str]]:
    """A run whose first ``n`` rows came back ambiguous (as a provider that cannot be asked leaves them)."""
    from dispatcher.campaigns import load_campaign
    from dispatcher.runs import audience_filter, run_spec
    from dispatcher.store import Outcome

    rt = project.runtime()
    loaded = load_campaign(project.root / CAMPAIGN, project.root / "templates")
    spec = run_spec(rt, loaded)
    rt.store.create_run(spec, audience_filter(loaded))
    claimed = rt.store.claim(spec.run_id, 0, "w")[:n]
    rt.store.record(
        [
            Outcome(
                id=c.id,
                run_id=c.run_id,
                state="unknown",
                attempt=1,
                gateway="http",
                outcome="unknown",
                error_code="http.timeout",
            )
            for c in claimed
        ]
    )
    rt.store.release([c.id for c in rt.store.orphans(spec.run_id, 0) if c.id not in {x.id for x in claimed}], None)
    return spec.run_id, [c.phone for c in claimed]


def test_operator_settles_unknown_rows_with_a_reason_recorded_in_the_ledger(project: Project) -> None:
    project.registry(size=40, seed=31)
    run_id, phones = _run_with_unknown_rows(project, 4)
    one = project.dispatch(
        "settle",
        run_id,
        "--as",
        "sent",
        "--phone",
        phones[0],
        "--reason",
        "in the provider's report",
        "--by",
        "wang",
        "--json",
    )
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["settled"] == 1
    rest = project.dispatch("settle", run_id, "--as", "failed", "--reason", "provider has no record", "--json")
    st = json.loads(rest.stdout)
    assert st["settled"] == 3 and st["counts"].get("unknown", 0) == 0
    rows = {r.phone: r for r in project.runtime().store.deliveries(run_id)}
    assert rows[phones[0]].state == "sent"
    assert {rows[p].state for p in phones[1:]} == {"failed"}
    assert rows[phones[1]].error_code == "operator.failed"
    verify = project.dispatch("audit", "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = project.dispatch("audit", "log", "--run", run_id, "--state", "failed", "--format", "jsonl")
    events = [json.loads(line) for line in log.stdout.splitlines() if line.strip()]
    assert events and all(
        e["actor"].startswith("operator:") and e["reason"] == "provider has no record" for e in events
    )


def test_settling_unknown_rows_as_pending_sends_them_again(project: Project) -> None:
    project.registry(size=40, seed=32)
    run_id, phones = _run_with_unknown_rows(project, 3)
    result = project.dispatch(
        "settle", run_id, "--as", "pending", "--reason", "provider confirms never received", "--json"
    )
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert st["settled"] == 3 and st["open"] == 0
    sent_to = collections.Counter(line["to"] for line in read_outbox(project.outbox))
    assert all(sent_to[p] == 1 for p in phones)


def test_settle_refuses_a_bad_verdict_or_a_missing_reason(project: Project) -> None:
    project.registry(size=10, seed=33)
    run_id, _ = _run_with_unknown_rows(project, 1)
    bad = project.dispatch("settle", run_id, "--as", "delivered", "--reason", "x")
    assert bad.returncode == 2 and bad.stderr.strip() == "as: --as must be sent, failed or pending, got 'delivered'"
    empty = project.dispatch("settle", run_id, "--as", "sent", "--reason", " ")
    assert empty.returncode == 2 and "reason" in empty.stderr
    assert project.runtime().store.counts(run_id).get("unknown") == 1
