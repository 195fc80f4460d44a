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
from ._rows import as_utc
from .base import HANDED_OVER_STATES

#: a recipient counts as reached once a row of theirs is in one of these states: handed to a carrier
#: that did not report a failure (``unconfirmed``: it never reported at all, counted apart as well)
REACHED_STATES = ("sent", "delivered", "unconfirmed")
#: what carriers confirmed, best first: a resident's best row decides which one they count under
CONFIRMATION_RANK = (("delivered", 3), ("unconfirmed", 2), ("undelivered", 1))
#: what the assessment (考核) counts as reached: handed over and not reported failed. Stricter than the
#: coverage report's REACHED_STATES: a row the carrier never confirmed (``unconfirmed``) does not count
ASSESSED_STATES = ("sent", "delivered")
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
class RunSpend:
    """What one run's accepted parts cost: parts times the price its provider had when the run was made."""

    run_id: str
    owner: str
    #: fire time (scheduled runs) or creation time: what places the run in a period
    when: datetime
    parts: int
    cost: float


@dataclass(frozen=True)
class QuarterReach:
    """Residents (registry now, not opted out) and how many of them were reached in each quarter."""

    eligible: int
    #: one figure per quarter window asked for, in order
    reached: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """Residents sharing one district and one exact set of groups, and how many were reached per quarter.

    Every per-district, per-group and per-owner figure is a sum over profiles, so one pass over the
    registry serves them all and a resident in several groups is still counted once wherever needed.
    """

    district: str
    segments: frozenset[str]
    reach: QuarterReach


@dataclass(frozen=True)
class AssessmentCounts:
    profiles: list[Profile]
    #: run id -> index of its quarter window, for the SMS runs of the year
    runs: dict[str, int]
    #: (run id, district) pairs: the run reached someone whose row names that district
    run_districts: list[tuple[str, str]]
    #: (run id, segment) pairs: the run reached someone in that group (registry now)
    run_segments: list[tuple[str, str]]


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
        when = sa.func.coalesce(r.c.fire_time, r.c.created_at)
        query = query.where(when >= window.start, when < window.end)
    return query


def _run_time() -> Any:
    r = t.runs
    return sa.func.coalesce(r.c.fire_time, r.c.created_at)


def _utc(value: datetime) -> datetime:
    utc = as_utc(value)
    assert utc is not None  # a run always has a creation time
    return utc


def _price_now(gateway: Any, prices: dict[str, float]) -> Any:
    """The current price of a provider, for runs created before prices were recorded with the run."""
    if not prices:
        return sa.literal(0.0)
    return sa.case(*((gateway == name, sa.literal(price)) for name, price in prices.items()), else_=sa.literal(0.0))


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
        when = sa.func.coalesce(r.c.fire_time, r.c.created_at)
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

    def spend(self, window: Window, prices_now: dict[str, float]) -> list[RunSpend]:
        """Per run of the window: SMS parts its providers accepted and what they cost.

        Each row's parts are priced at the price its provider (the one that took it, after any
        failover) had in ``run_prices`` when the run was created; a run from before prices were
        recorded is priced at ``prices_now``. Rows never handed over cost nothing.
        """
        r, d, p = t.runs, t.deliveries, t.run_prices
        when = _run_time()
        price = sa.func.coalesce(p.c.price_per_part, _price_now(d.c.gateway, prices_now))
        parts = sa.func.coalesce(d.c.parts, 0)
        query = (
            sa.select(r.c.id, r.c.owner, when, sa.func.sum(parts), sa.func.sum(parts * price))
            .select_from(
                d.join(r, r.c.id == d.c.run_id).outerjoin(
                    p, sa.and_(p.c.run_id == d.c.run_id, p.c.gateway == d.c.gateway)
                )
            )
            .where(d.c.state.in_(HANDED_OVER_STATES), when >= window.start, when < window.end)
            .group_by(r.c.id, r.c.owner, when)
        )
        with self._db.read() as conn:
            return [
                RunSpend(run_id, owner, _utc(at), int(n or 0), float(cost or 0.0))
                for run_id, owner, at, n, cost in conn.execute(query)
            ]

    def assessment(self, quarters: list[Window], segments: list[str]) -> AssessmentCounts:
        """Residents reached by SMS per quarter, by district and set of groups, and which runs reached whom.

        ``quarters``: consecutive windows (a year's four quarters); ``segments``: every group id (at most
        62, each a bit of the residents' group mask). Reached = a row in ``ASSESSED_STATES`` in an SMS run
        whose fire (else creation) time falls in the quarter. One pass over the year's reached rows builds
        a per-resident flag per quarter, and one grouped pass over the registry counts residents by
        (district, group mask): a few thousand rows however large the registry.
        """
        r, rs, d, runs = t.residents, t.resident_segments, t.deliveries, t.runs
        when = _run_time()
        start, end = quarters[0].start, quarters[-1].end
        # SMS runs only: a ringback enrolment plays the warning to a resident's callers, not to the resident
        in_year = (when >= start, when < end, runs.c.channel == "sms")
        flags = [
            sa.func.max(sa.case((sa.and_(when >= q.start, when < q.end), 1), else_=0)).label(f"q{i}")
            for i, q in enumerate(quarters)
        ]
        per_resident = (
            sa.select(d.c.resident_id.label("resident_id"), *flags)
            .select_from(d.join(runs, runs.c.id == d.c.run_id))
            .where(d.c.state.in_(ASSESSED_STATES), *in_year)
            .group_by(d.c.resident_id)
            .subquery()
        )
        bit = sa.case(*((rs.c.segment == seg, sa.literal(1 << i)) for i, seg in enumerate(segments)), else_=0)
        masks = (
            sa.select(rs.c.resident_id.label("resident_id"), sa.func.sum(bit).label("mask"))
            .group_by(rs.c.resident_id)
            .subquery()
        )
        mask = sa.func.coalesce(masks.c.mask, 0)
        sums = [sa.func.coalesce(sa.func.sum(per_resident.c[f"q{i}"]), 0) for i in range(len(quarters))]
        with self._db.read() as conn:
            run_quarters = {
                run_id: next(i for i, q in enumerate(quarters) if q.start <= _utc(at) < q.end)
                for run_id, at in conn.execute(sa.select(runs.c.id, when).where(*in_year))
            }
            profiles = [
                Profile(
                    dist,
                    frozenset(seg for i, seg in enumerate(segments) if int(bits) >> i & 1),
                    QuarterReach(int(n), tuple(int(v) for v in reached)),
                )
                for dist, bits, n, *reached in conn.execute(
                    sa.select(r.c.district, mask, sa.func.count(), *sums)
                    .select_from(
                        r.outerjoin(masks, masks.c.resident_id == r.c.id).outerjoin(
                            per_resident, per_resident.c.resident_id == r.c.id
                        )
                    )
                    .where(r.c.opted_out.is_(False))
                    .group_by(r.c.district, mask)
                )
            ]
            reached_rows = d.join(runs, runs.c.id == d.c.run_id)
            run_districts = [
                (run_id, dist)
                for run_id, dist in conn.execute(
                    sa.select(d.c.run_id, d.c.district)
                    .select_from(reached_rows)
                    .where(d.c.state.in_(ASSESSED_STATES), *in_year)
                    .distinct()
                )
            ]
            run_segments = [
                (run_id, seg)
                for run_id, seg in conn.execute(
                    sa.select(d.c.run_id, rs.c.segment)
                    .select_from(reached_rows.join(rs, rs.c.resident_id == d.c.resident_id))
                    .where(d.c.state.in_(ASSESSED_STATES), *in_year)
                    .distinct()
                )
            ]
        return AssessmentCounts(profiles, run_quarters, run_districts, run_segments)

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
