"""The outbox ringback adapter: one JSON line per enrol/restore in ``ringback.jsonl`` beside the SMS outbox.

For demos and drills: the same format rules as the SMS outbox (flock, one write per line).
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..base import RingbackRequest, RingbackResult


def read_ringback_outbox(path: Path) -> Any:
    """Every complete line of the ringback outbox (same format rules as the SMS outbox)."""
    from .gateway import read_outbox

    return read_outbox(path)


class OutboxRingback:
    """Writes each action as one JSON line (flock, one write per line), like the SMS outbox."""

    name = "outbox"
    #: a local file: nothing to wait for, so nothing gained from several at once
    concurrency = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, action: str, request: RingbackRequest) -> RingbackResult:
        record = {
            "action": action,
            "key": request.key,
            "run_id": request.run_id,
            "campaign_id": request.campaign_id,
            "to": request.phone,
            "text": request.text,
            "start": request.start.isoformat(),
            "end": request.end.isoformat(),
            "at": datetime.now(UTC).isoformat(),
        }
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
        finally:
            os.close(fd)
        return RingbackResult(provider_id=f"outbox:{action}:{request.key}", kept={"tone": "outbox"})

    def enrol(self, request: RingbackRequest) -> RingbackResult:
        return self._append("enrol", request)

    def restore(self, request: RingbackRequest) -> RingbackResult:
        return self._append("restore", request)

    def close(self) -> None:
        return None
