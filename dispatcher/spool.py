"""Recording a batch's results even when the delivery log is briefly unreachable.

Messages already handed to a gateway must end up in the log: forgetting them would
leave rows in ``sending`` (or worse, send them again). So a worker that cannot write
its results keeps them in a local spool file (written whole, then renamed into place)
and retries with backoff; the file goes once the results are in the database. A
worker replays whatever a previous process left in the spool before taking new work.
Replaying twice is harmless: recording is fenced on each row's claim token.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .errors import StoreError
from .store import Outcome

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.spool")
_REPLAY_LOCK = threading.Lock()
_DATES = {f.name for f in fields(Outcome) if f.name in ("next_attempt_at",)}


def _encode(outcome: Outcome) -> dict[str, Any]:
    data = asdict(outcome)
    for name in _DATES:
        if data[name] is not None:
            data[name] = data[name].isoformat()
    return data


def _decode(data: dict[str, Any]) -> Outcome:
    for name in _DATES:
        if data.get(name):
            data[name] = datetime.fromisoformat(data[name])
    return Outcome(**data)


def put(directory: Path, outcomes: list[Outcome]) -> Path | None:
    """Write the outcomes to a new spool file (whole or not at all); None if even that failed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
        tmp = final.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump([_encode(o) for o in outcomes], fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(final)
        return final
    except OSError as exc:
        log.error("spool.write_failed", error=str(exc), outcomes=len(outcomes))
        with contextlib.suppress(OSError, UnboundLocalError):
            tmp.unlink()
        return None


def _give_up_after(runtime: Runtime, give_up_after: float | None) -> float:
    settings = runtime.settings
    limit = settings.record_retry_for if give_up_after is None else give_up_after
    if settings.embedded:
        # the in-process run stops and reports instead of waiting minutes; `resume` reconciles the rows
        limit = min(limit, 10.0)
    return limit


def _delays(limit: float) -> Iterator[float]:
    """Backoff pauses (0.25 s doubling to 5 s) for as long as they fit in ``limit`` seconds."""
    deadline = time.monotonic() + limit
    delay = 0.25
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(5.0, delay * 2)


def record_durably(runtime: Runtime, outcomes: list[Outcome], *, give_up_after: float | None = None) -> None:
    """Record outcomes, retrying with backoff while the log is unreachable; raise StoreError on giving up.

    The results are spooled at the first failure, so they survive this process; the spool file
    is removed once they are in the log.
    """
    if not outcomes:
        return
    settings = runtime.settings
    delays = _delays(_give_up_after(runtime, give_up_after))
    spooled: Path | None = None
    tries = 0
    while True:
        try:
            runtime.store.record(outcomes, actor=runtime.worker_id)
        except StoreError as exc:
            tries += 1
            if spooled is None:
                spooled = put(settings.spool_dir, outcomes)
                log.warning("batch.record_failed", error=str(exc), outcomes=len(outcomes), spooled=bool(spooled))
            if tries == 3 and settings.embedded:
                # the in-process run reports it and exits; a worker process waits for the log to come back
                runtime.fatal = f"the delivery log cannot be written: {exc}"
            delay = next(delays, None)
            if delay is None:
                raise
            time.sleep(delay)
            continue
        if spooled is not None:
            with contextlib.suppress(OSError):
                spooled.unlink()
            log.info("batch.recorded_after_retry", outcomes=len(outcomes), tries=tries + 1)
        return


def release_durably(runtime: Runtime, ids: list[int], token: str | None, *, give_up_after: float | None = None) -> int:
    """Give claimed rows nothing was handed over for back to ``pending``, waiting out a log outage.

    A batch that fails before its first hand-over (the log went away between the claim and the
    frequency-cap read) holds rows that no other worker may take while this one lives: a
    redelivered message would claim nothing and ``resume`` leaves a live worker's rows alone.
    So the release is retried like a record (it is fenced on the token, so trying twice is
    harmless); only if this process gives up do the rows wait for ``resume`` or the watchdog.
    """
    delays = _delays(_give_up_after(runtime, give_up_after))
    tries = 0
    while True:
        try:
            released = runtime.store.release(ids, token)
        except StoreError as exc:
            tries += 1
            if tries == 1:
                log.warning("batch.release_failed", error=str(exc), rows=len(ids))
            delay = next(delays, None)
            if delay is None:
                log.error("batch.release_abandoned", error=str(exc), rows=len(ids))
                return 0
            time.sleep(delay)
            continue
        if tries:
            log.info("batch.released_after_retry", rows=released, tries=tries + 1)
        return released


def replay(runtime: Runtime) -> int:
    """Record what earlier attempts (this process or a dead one) left in the spool; returns files done."""
    directory = runtime.settings.spool_dir
    if not directory.is_dir():
        return 0
    done = 0
    with _REPLAY_LOCK:
        for path in sorted(directory.glob("*.json")):
            try:
                outcomes = [_decode(item) for item in json.loads(path.read_text(encoding="utf-8"))]
            except (OSError, ValueError, TypeError) as exc:
                log.error("spool.unreadable", file=path.name, error=str(exc))
                continue
            runtime.store.record(outcomes, actor=runtime.worker_id)
            with contextlib.suppress(OSError):
                path.unlink()
            done += 1
    if done:
        log.info("spool.replayed", files=done)
    return done
