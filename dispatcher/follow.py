"""Watching a run until nothing is left open, the way ``dispatch run`` and ``resume`` wait for it.

On the embedded broker the run is sent by a worker started inside this process for the
duration; with Redis the workers are elsewhere and this only polls the delivery log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from .batch import context_from_run
from .errors import StoreError
from .runs import RunStatus, status
from .sender import window_opening
from .workers import start_worker, stop_worker, stub_idle

if TYPE_CHECKING:
    from .runtime import Runtime

#: called with (rows done, rows in the run) after each poll
Progress = Callable[[int, int], None]


def follow_run(runtime: Runtime, run_id: str, *, embedded: bool, on_progress: Progress | None = None) -> RunStatus:
    """Poll the delivery log until the run has nothing open (or, embedded, the broker is idle)."""
    worker = heartbeat = None
    if embedded:
        worker, heartbeat = start_worker(runtime)
    try:
        idle_since: float | None = None
        while True:
            if runtime.fatal:
                break
            st = status(runtime, run_id)
            if on_progress is not None:
                on_progress(st.total - st.open, st.total)
            if st.open == 0 or st.status in ("completed", "cancelled") or st.halted:
                break
            if st.open == st.counts.get("unknown", 0):
                # only rows the provider left ambiguous are open: no worker moves them, an operator does
                # (`resume` asks the provider, `settle` decides); waiting on would never end with Redis
                break
            if embedded:
                # nothing queued and nothing in flight: what is still open waits on an operator (unknown rows)
                if stub_idle(runtime):
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 1.0:
                        break
                else:
                    idle_since = None
            time.sleep(0.2)
    finally:
        if worker is not None and heartbeat is not None:
            stop_worker(runtime, worker, heartbeat)
    if runtime.fatal:
        # the delivery log cannot be written: say so once and stop; `resume` reconciles what is in flight
        raise StoreError(f"run {run_id} stopped: {runtime.fatal}; when it is fixed, `dispatch resume {run_id}`")
    runtime.store.finish_if_done(run_id)
    st = status(runtime, run_id)
    if st.halted:
        raise StoreError(f"run {run_id} stopped: {st.halted}; when it is fixed, `dispatch resume {run_id}`")
    return st


def embedded_wait_until(runtime: Runtime, run_id: str) -> datetime | None:
    """On the embedded broker, when a bulk run outside its send window may send (None: it may now).

    Such a run cannot wait inside a command: it stays pending for ``dispatch resume``; with
    Redis the workers defer it themselves, so this is None there.
    """
    if not runtime.settings.embedded:
        return None
    return window_opening(runtime, context_from_run(runtime.store.get_run(run_id)))
