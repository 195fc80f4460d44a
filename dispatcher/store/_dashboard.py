"""Reads the dashboard's pages need beyond a run's own record."""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa

from . import _leases as leases
from . import schema as t
from ._db import Db


class DashboardReads:
    """Reached as ``store.dashboard``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def counts_by_run(self, run_ids: list[str]) -> dict[str, dict[str, int]]:
        """run id -> state -> rows, in one grouped query for a page of runs (a missing run or state is 0)."""
        d = t.deliveries
        out: dict[str, dict[str, int]] = defaultdict(dict)
        if not run_ids:
            return out
        with self._db.read() as conn:
            for run_id, state, n in conn.execute(
                sa.select(d.c.run_id, d.c.state, sa.func.count())
                .where(d.c.run_id.in_(run_ids))
                .group_by(d.c.run_id, d.c.state)
            ):
                out[run_id][state] = int(n)
            # a live lease's rows read pending but are in flight (store/_leases.py)
            held: dict[str, int] = defaultdict(int)
            for lease in leases.all_of(conn, run_ids):
                held[lease.run_id] += len(lease.ids)
        for run_id, n in held.items():
            out[run_id] = leases.as_sending(out[run_id], n)
        return out
