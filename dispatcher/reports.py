"""Reports for the annual assessment (考核) and the coverage goal (全区域覆盖、全人群覆盖).

Every figure is one aggregate query in the database, so a report over millions of
delivery rows costs no Python memory. Definitions, so auditors can re-count them:

- **eligible** (coverage): residents in the registry now, not opted out, in that
  district (their registry district) and population group. A resident in three
  groups counts once in each of the three cells.
- **reached**: of those, residents with at least one delivery row in state
  ``sent`` or ``delivered`` in a run of the period; **delivered**: in state
  ``delivered`` (a carrier receipt). Percent = reached / eligible.
- A run belongs to a period by its fire time (scheduled runs) or else its
  creation time, in Asia/Shanghai.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import sqlalchemy as sa

from . import domain
from .audit import LOCAL_TZ
from .errors import UsageError
from .store import schema as t
from .store.base import HANDED_OVER_STATES
from .store.sql import SqlStore

REACHED_STATES = ("sent", "delivered")
FAILED_STATES = ("failed", "undelivered", "expired", "unknown")

_PERIOD_RE = re.compile(r"^(\d{4})(?:Q([1-4])|-(\d{2}))?$")


@dataclass(frozen=True)
class Period:
    label: str
    start: datetime  # UTC, inclusive
    end: datetime  # UTC, exclusive


def quarter_of(when: datetime) -> str:
    """The quarter label (``2021Q3``) of an instant, in Asia/Shanghai like every period."""
    local = when.astimezone(LOCAL_TZ)
    return f"{local.year}Q{(local.month - 1) // 3 + 1}"


def parse_period(text: str, option: str = "period") -> Period:
    """``2021Q1`` (a quarter), ``2021-03`` (a month) or ``2021`` (a year), in Asia/Shanghai."""
    m = _PERIOD_RE.match(text.strip().upper())
    month = int(m.group(3)) if m and m.group(3) else None
    if m is None or (month is not None and not 1 <= month <= 12):
        raise UsageError(
            f"--{option}: expected a quarter (2021Q1), a month (2021-03) or a year (2021), got {text!r}",
            field=option,
        )
    year = int(m.group(1))
    if m.group(2):
        first, months = (int(m.group(2)) - 1) * 3 + 1, 3
    elif month is not None:
        first, months = month, 1
    else:
        first, months = 1, 12
    start = datetime(year, first, 1, tzinfo=LOCAL_TZ)
    end_month = first + months
    end = datetime(year + (end_month - 1) // 12, (end_month - 1) % 12 + 1, 1, tzinfo=LOCAL_TZ)
    return Period(text.strip().upper(), start.astimezone(UTC), end.astimezone(UTC))


def _runs_in(period: Period | None) -> Any:
    r = t.runs
    query = sa.select(r.c.id)
    if period is not None:
        when = sa.func.coalesce(r.c.fire_time, r.c.created_at)
        query = query.where(when >= period.start, when < period.end)
    return query


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def coverage(store: SqlStore, period: Period) -> dict[str, Any]:
    """District x segment: eligible, reached, delivered and percent, with every cell present (zeros too)."""
    r, rs, d = t.residents, t.resident_segments, t.deliveries
    per_resident = (
        sa.select(
            d.c.resident_id.label("resident_id"),
            sa.func.max(sa.case((d.c.state.in_(REACHED_STATES), 1), else_=0)).label("reached"),
            sa.func.max(sa.case((d.c.state == "delivered", 1), else_=0)).label("delivered"),
        )
        .where(d.c.run_id.in_(_runs_in(period)))
        .group_by(d.c.resident_id)
        .subquery()
    )
    reached = sa.func.coalesce(sa.func.sum(per_resident.c.reached), 0)
    delivered = sa.func.coalesce(sa.func.sum(per_resident.c.delivered), 0)
    eligible_only = r.c.opted_out.is_(False)
    with store._read() as conn:
        runs = int(conn.execute(sa.select(sa.func.count()).select_from(_runs_in(period).subquery())).scalar_one())
        cells_q = (
            sa.select(r.c.district, rs.c.segment, sa.func.count(), reached, delivered)
            .select_from(
                r.join(rs, rs.c.resident_id == r.c.id).outerjoin(per_resident, per_resident.c.resident_id == r.c.id)
            )
            .where(eligible_only)
            .group_by(r.c.district, rs.c.segment)
        )
        found = {(dist, seg): (int(n), int(re_), int(de)) for dist, seg, n, re_, de in conn.execute(cells_q)}
        district_q = (
            sa.select(r.c.district, sa.func.count(), reached, delivered)
            .select_from(r.outerjoin(per_resident, per_resident.c.resident_id == r.c.id))
            .where(eligible_only)
            .group_by(r.c.district)
        )
        by_district = {dist: (int(n), int(re_), int(de)) for dist, n, re_, de in conn.execute(district_q)}
    cells = []
    for dist in domain.DISTRICTS:
        for seg in domain.SEGMENTS:
            n, re_, de = found.get((dist.id, seg.id), (0, 0, 0))
            cells.append({
                "district": dist.id, "district_name": dist.name, "segment": seg.id, "segment_name": seg.name,
                "eligible": n, "reached": re_, "delivered": de, "percent": _pct(re_, n),
            })  # fmt: skip
    districts = []
    for dist in domain.DISTRICTS:
        n, re_, de = by_district.get(dist.id, (0, 0, 0))
        districts.append(
            {
                "district": dist.id,
                "district_name": dist.name,
                "eligible": n,
                "reached": re_,
                "delivered": de,
                "percent": _pct(re_, n),
            }
        )
    return {
        "period": period.label, "start": period.start.isoformat(), "end": period.end.isoformat(),
        "runs": runs, "cells": cells, "districts": districts,
    }  # fmt: skip


def departments(store: SqlStore, period: Period) -> dict[str, Any]:
    """Per owning department: campaigns, runs, recipients, sent, delivered, failed by cause, parts sent."""
    r, d = t.runs, t.deliveries
    when = sa.func.coalesce(r.c.fire_time, r.c.created_at)
    in_period = (when >= period.start, when < period.end)

    def empty(key: str, name: str) -> dict[str, Any]:
        return {
            "department": key, "name": name, "campaigns": 0, "runs": 0, "recipients": 0, "sent": 0,
            "delivered": 0, "failed": 0, "failed_by_cause": {}, "parts_sent": 0,
        }  # fmt: skip

    # every department appears, even one that ran nothing: the assessment (考核) must show the zero
    stats: dict[str, dict[str, Any]] = {dep.id: empty(dep.id, dep.name) for dep in domain.DEPARTMENTS}

    def slot(owner: str) -> dict[str, Any]:
        dep = domain.department(owner)
        key = dep.id if dep else owner
        return stats.setdefault(key, empty(key, key))

    with store._read() as conn:
        for owner, campaigns, runs in conn.execute(
            sa.select(r.c.owner, sa.func.count(sa.distinct(r.c.campaign_id)), sa.func.count())
            .where(*in_period)
            .group_by(r.c.owner)
        ):
            s = slot(owner)
            s["campaigns"] += int(campaigns)
            s["runs"] += int(runs)
        joined = d.join(r, r.c.id == d.c.run_id)
        for owner, recipients, sent, delivered, parts in conn.execute(
            sa.select(
                r.c.owner,
                sa.func.sum(sa.case((d.c.state != "skipped", 1), else_=0)),
                sa.func.sum(sa.case((d.c.state.in_(REACHED_STATES), 1), else_=0)),
                sa.func.sum(sa.case((d.c.state == "delivered", 1), else_=0)),
                # the same parts `dispatch status` counts: a delivery report never un-sends a part
                sa.func.sum(sa.case((d.c.state.in_(HANDED_OVER_STATES), sa.func.coalesce(d.c.parts, 0)), else_=0)),
            )
            .select_from(joined)
            .where(*in_period)
            .group_by(r.c.owner)
        ):
            s = slot(owner)
            s["recipients"] += int(recipients or 0)
            s["sent"] += int(sent or 0)
            s["delivered"] += int(delivered or 0)
            s["parts_sent"] += int(parts or 0)
        cause = sa.func.coalesce(d.c.error_code, d.c.reason, d.c.state)
        for owner, why, n in conn.execute(
            sa.select(r.c.owner, cause, sa.func.count())
            .select_from(joined)
            .where(*in_period, d.c.state.in_(FAILED_STATES))
            .group_by(r.c.owner, cause)
        ):
            s = slot(owner)
            s["failed"] += int(n)
            s["failed_by_cause"][str(why)] = s["failed_by_cause"].get(str(why), 0) + int(n)
    return {
        "period": period.label,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "departments": list(stats.values()),
    }


def failures(store: SqlStore, period: Period | None = None) -> dict[str, Any]:
    """Rows that did not go out, by error code, gateway and state (``reason`` when there is no code)."""
    d = t.deliveries
    code = sa.func.coalesce(d.c.error_code, d.c.reason, sa.literal(""))
    gateway = sa.func.coalesce(d.c.gateway, sa.literal(""))
    query = (
        sa.select(code, gateway, d.c.state, sa.func.count())
        .where(d.c.state.in_(FAILED_STATES))
        .group_by(code, gateway, d.c.state)
        .order_by(sa.func.count().desc())
    )
    if period is not None:
        query = query.where(d.c.run_id.in_(_runs_in(period)))
    with store._read() as conn:
        rows = [{"error_code": c, "gateway": g, "state": s, "count": int(n)} for c, g, s, n in conn.execute(query)]
    totals: dict[str, int] = defaultdict(int)
    for row in rows:
        totals[row["error_code"]] += row["count"]
    return {"period": period.label if period else "all", "failures": rows, "by_error_code": dict(totals)}


# ------------------------------------------------------------------ output

CSV_COLUMNS = {
    "coverage": (
        "district",
        "district_name",
        "segment",
        "segment_name",
        "eligible",
        "reached",
        "delivered",
        "percent",
    ),
    "departments": (
        "department",
        "name",
        "campaigns",
        "runs",
        "recipients",
        "sent",
        "delivered",
        "failed",
        "failed_by_cause",
        "parts_sent",
    ),
    "failures": ("error_code", "gateway", "state", "count"),
}


def rows_of(kind: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    return report[{"coverage": "cells", "departments": "departments", "failures": "failures"}[kind]]


def write_csv(kind: str, report: dict[str, Any], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    columns = CSV_COLUMNS[kind]
    writer.writerow(columns)
    for row in rows_of(kind, report):
        writer.writerow(
            [
                json.dumps(row[c], ensure_ascii=False, sort_keys=True) if isinstance(row[c], dict) else row[c]
                for c in columns
            ]
        )
