"""Aggregate reads behind the assessment reports (coverage, departments, failures).

Every figure is one aggregate query, so a report over millions of delivery rows costs no
Python memory; ``dispatcher.reports`` lays the figures out. A run belongs to a period by its
fire time (scheduled runs) or else its creation time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from . import schema as t
from ._db import Db
from .base import HANDED_OVER_STATES

#: a recipient counts as reached once a row of theirs is in one of these states: handed to a carrier
#: that did not report a failure (``unconfirmed``: it never reported at all, counted apart as well)
REACHED_STATES = ("sent", "delivered", "unconfirmed")
#: what carriers confirmed, best first: a resident's best row decides which one they count under
CONFIRMATION_RANK = (("delivered", 3), ("unconfirmed", 2), ("undelivered", 1))
#: rows that did not go out
FAILED_STATES = ("failed", "undelivered", "expired", "unknown")


@dataclass(frozen=True)
class Window:
    """A half-open time window ``[start, end)`` in UTC."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class Reach:
    eligible: int
    reached: int
    delivered: int
    #: reached residents none of whose rows was delivered: the carrier said undelivered / never said
    undelivered: int = 0
    unconfirmed: int = 0


@dataclass(frozen=True)
class CoverageCounts:
    runs: int
    #: (district, segment) -> reach; only cells with residents are present
    cells: dict[tuple[str, str], Reach]
    #: district -> reach; only districts with residents are present
    districts: dict[str, Reach]


@dataclass(frozen=True)
class OwnerRuns:
    owner: str
    campaigns: int
    runs: int


@dataclass(frozen=True)
class OwnerSends:
    owner: str
    recipients: int
    sent: int
    delivered: int
    parts_sent: int


@dataclass(frozen=True)
class OwnerFailures:
    owner: str
    cause: str
    count: int


@dataclass(frozen=True)
class DepartmentCounts:
    runs: list[OwnerRuns]
    sends: list[OwnerSends]
    failures: list[OwnerFailures]


@dataclass(frozen=True)
class FailureCount:
    error_code: str
    gateway: str
    state: str
    count: int


def _runs_in(window: Window | None) -> Any:
    r = t.runs
    query = sa.select(r.c.id)
    if window is not None:
        when = sa.func.coalesce(r.c.fire_time, r.c.as_of, r.c.created_at)
        query = query.where(when >= window.start, when < window.end)
    return query


class ReportReads:
    """The report queries; reached as ``store.reports``."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def coverage(self, window: Window) -> CoverageCounts:
        """District x segment and per district: eligible residents (not opted out), reached, delivered."""
        r, rs, d = t.residents, t.resident_segments, t.deliveries
        per_resident = (
            sa.select(
                d.c.resident_id.label("resident_id"),
                sa.func.max(sa.case((d.c.state.in_(REACHED_STATES), 1), else_=0)).label("reached"),
                sa.func.max(sa.case(*((d.c.state == state, rank) for state, rank in CONFIRMATION_RANK), else_=0)).label(
                    "confirmation"
                ),
            )
            .where(d.c.run_id.in_(_runs_in(window)))
            .group_by(d.c.resident_id)
            .subquery()
        )
        reached = sa.func.coalesce(sa.func.sum(per_resident.c.reached), 0)

        def confirmed(rank: int) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case((per_resident.c.confirmation == rank, 1), else_=0)), 0)

        delivered, unconfirmed, undelivered = (confirmed(rank) for _, rank in CONFIRMATION_RANK)
        eligible_only = r.c.opted_out.is_(False)
        with self._db.read() as conn:
            runs = int(conn.execute(sa.select(sa.func.count()).select_from(_runs_in(window).subquery())).scalar_one())
            cells_q = (
                sa.select(r.c.district, rs.c.segment, sa.func.count(), reached, delivered, undelivered, unconfirmed)
                .select_from(
                    r.join(rs, rs.c.resident_id == r.c.id).outerjoin(per_resident, per_resident.c.resident_id == r.c.id)
                )
                .where(eligible_only)
                .group_by(r.c.district, rs.c.segment)
            )
            cells = {(dist, seg): Reach(*(int(v) for v in figures)) for dist, seg, *figures in conn.execute(cells_q)}
            district_q = (
                sa.select(r.c.district, sa.func.count(), reached, delivered, undelivered, unconfirmed)
                .select_from(r.outerjoin(per_resident, per_resident.c.resident_id == r.c.id))
                .where(eligible_only)
                .group_by(r.c.district)
            )
            districts = {dist: Reach(*(int(v) for v in figures)) for dist, *figures in conn.execute(district_q)}
        return CoverageCounts(runs, cells, districts)

    def departments(self, window: Window) -> DepartmentCounts:
        """Per run owner: campaigns and runs, recipients and sends, failures by cause."""
        r, d = t.runs, t.deliveries
        when = sa.func.coalesce(r.c.fire_time, r.c.as_of, r.c.created_at)
        in_period = (when >= window.start, when < window.end)
        with self._db.read() as conn:
            runs = [
                OwnerRuns(owner, int(campaigns), int(n))
                for owner, campaigns, n in conn.execute(
                    sa.select(r.c.owner, sa.func.count(sa.distinct(r.c.campaign_id)), sa.func.count())
                    .where(*in_period)
                    .group_by(r.c.owner)
                )
            ]
            joined = d.join(r, r.c.id == d.c.run_id)
            sends = [
                OwnerSends(owner, int(recipients or 0), int(sent or 0), int(delivered or 0), int(parts or 0))
                for owner, recipients, sent, delivered, parts in conn.execute(
                    sa.select(
                        r.c.owner,
                        sa.func.sum(sa.case((d.c.state != "skipped", 1), else_=0)),
                        sa.func.sum(sa.case((d.c.state.in_(REACHED_STATES), 1), else_=0)),
                        sa.func.sum(sa.case((d.c.state == "delivered", 1), else_=0)),
                        # the same parts `dispatch status` counts: a delivery report never un-sends a part
                        sa.func.sum(
                            sa.case((d.c.state.in_(HANDED_OVER_STATES), sa.func.coalesce(d.c.parts, 0)), else_=0)
                        ),
                    )
                    .select_from(joined)
                    .where(*in_period)
                    .group_by(r.c.owner)
                )
            ]
            cause = sa.func.coalesce(d.c.error_code, d.c.reason, d.c.state)
            failures = [
                OwnerFailures(owner, str(why), int(n))
                for owner, why, n in conn.execute(
                    sa.select(r.c.owner, cause, sa.func.count())
                    .select_from(joined)
                    .where(*in_period, d.c.state.in_(FAILED_STATES))
                    .group_by(r.c.owner, cause)
                )
            ]
        return DepartmentCounts(runs, sends, failures)

    def failures(self, window: Window | None = None) -> list[FailureCount]:
        """Rows that did not go out, by error code (``reason`` when there is none), gateway and state."""
        d = t.deliveries
        code = sa.func.coalesce(d.c.error_code, d.c.reason, sa.literal(""))
        gateway = sa.func.coalesce(d.c.gateway, sa.literal(""))
        query = (
            sa.select(code, gateway, d.c.state, sa.func.count())
            .where(d.c.state.in_(FAILED_STATES))
            .group_by(code, gateway, d.c.state)
            .order_by(sa.func.count().desc())
        )
        if window is not None:
            query = query.where(d.c.run_id.in_(_runs_in(window)))
        with self._db.read() as conn:
            return [FailureCount(c, g, s, int(n)) for c, g, s, n in conn.execute(query)]
