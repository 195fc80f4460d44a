"""Logs are JSON with run context, and never show a phone number or a secret in full."""

from __future__ import annotations

import io
import json
import re

import structlog

from dispatcher import logs
from tests.conftest import Project

E164 = re.compile(r"\+86\d{11}")


def test_log_lines_mask_numbers_and_redact_secrets_wherever_they_appear() -> None:
    stream = io.StringIO()
    logs.configure("json", "INFO", stream)
    log = structlog.get_logger("t")
    with structlog.contextvars.bound_contextvars(run_id="r1", campaign_id="c1", batch=3):
        log.info(
            "sent",
            to="+8613812345678",
            detail={"phone": "13912345678", "auth_token": "s3cr3t"},
            note="call 13712345678 now",
        )
    line = json.loads(stream.getvalue())
    assert (line["run_id"], line["campaign_id"], line["batch"]) == ("r1", "c1", 3)
    assert line["to"] == "**********5678"
    assert line["detail"] == {"phone": "*******5678", "auth_token": "[redacted]"}
    assert line["note"] == "call *******5678 now"


def test_a_run_logs_as_json_without_a_single_full_phone_number(project: Project) -> None:
    csv_path = project.registry(size=300, seed=9)
    numbers = {line.split(",")[0] for line in csv_path.read_text(encoding="utf-8").splitlines()[1:]}
    failing = "+86" + sorted(numbers)[0]
    result = project.dispatch(
        "run", "campaigns/quarterly-themes.yaml",
        env={"DISPATCH_LOG_LEVEL": "DEBUG", "DISPATCH_OUTBOX_FAIL_PERMANENT": failing},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(r.get("event") == "batch.done" and r.get("run_id") for r in records)
    # the refused send is logged with its recipient, masked: with masking off this line carries the number
    refused = [r for r in records if r.get("event") == "send.refused"]
    assert refused and refused[0]["to"].endswith(failing[-4:]) and refused[0]["to"] != failing
    assert not E164.search(result.stderr)
    assert not any(n in result.stderr for n in numbers)
    assert not any(n[-8:] in result.stderr for n in numbers), "no more than the last four digits of any number"
