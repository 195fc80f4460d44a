"""Compare the outbox with the delivery log for a run (default: the newest): exactly one line per sent row."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from dispatcher.providers.outbox.gateway import read_outbox
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings


def main() -> int:
    outbox = Path(sys.argv[1])
    rt = Runtime(Settings.from_env())
    run = rt.store.get_run(sys.argv[2]) if len(sys.argv) > 2 else rt.store.list_runs(limit=1)[0]
    keys = collections.Counter(r["key"] for r in read_outbox(outbox) if r["run_id"] == run.id)
    sent = {row.key for row in rt.store.deliveries(run.id) if row.state == "sent"}
    eligible = sum(1 for row in rt.store.deliveries(run.id) if row.reason != "opted_out")
    twice = [k for k, n in keys.items() if n > 1]
    ok = not twice and set(keys) == sent and len(sent) == eligible
    print(
        f"run {run.id}: eligible {eligible}, sent rows {len(sent)}, outbox lines {sum(keys.values())}, "
        f"sent twice {len(twice)} -> {'OK' if ok else 'MISMATCH'}"
    )
    rt.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
