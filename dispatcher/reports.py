"""Reports for the annual assessment (考核) and the coverage goal (全区域覆盖、全人群覆盖).

Every figure is one aggregate query in the database, so a report over millions of
delivery rows costs no Python memory. Definitions, so auditors can re-count them:

- **eligible** (coverage): residents in the registry now, not opted out, in that
  district (their registry district) and population group. A resident in three
  groups counts once in each of the three cells.
- **reached**: of those, residents with at least one delivery row in state
  ``sent``, ``delivered`` or ``unconfirmed`` in a run of the period (handed to a
  carrier that reported no failure). Percent = reached / eligible.
- what the carriers confirmed, by each resident's best row: **delivered** (a
  carrier receipt), else **unconfirmed** (no final report by the deadline,
  ``DISPATCH_DLR_DEADLINE``), else **undelivered** (the carrier said it was not).
- A run belongs to a period by its fire time (scheduled runs), else the date it
  was run as of (``dispatch run --as-of``: a made-up fire of a past quarter counts
  in that quarter), else its creation time, in Asia/Shanghai.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from . import domain
from .audit import LOCAL_TZ
from .errors import UsageError
from .store import Reach, SqlStore, Window

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


def _window(period: Period | None) -> Window | None:
    return None if period is None else Window(period.start, period.end)


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def coverage(store: SqlStore, period: Period) -> dict[str, Any]:
    """District x segment: eligible, reached, delivered and percent, with every cell present (zeros too)."""
    counts = store.reports.coverage(Window(period.start, period.end))
    runs = counts.runs
    none = Reach(0, 0, 0)
    cells = []
    for dist in domain.DISTRICTS:
        for seg in domain.SEGMENTS:
            cell = counts.cells.get((dist.id, seg.id), none)
            n, re_ = cell.eligible, cell.reached
            cells.append({
                "district": dist.id, "district_name": dist.name, "segment": seg.id, "segment_name": seg.name,
                "eligible": n, "reached": re_, "delivered": cell.delivered, "undelivered": cell.undelivered,
                "unconfirmed": cell.unconfirmed, "percent": _pct(re_, n),
            })  # fmt: skip
    districts = []
    for dist in domain.DISTRICTS:
        reach = counts.districts.get(dist.id, none)
        n, re_ = reach.eligible, reach.reached
        districts.append(
            {
                "district": dist.id,
                "district_name": dist.name,
                "eligible": n,
                "reached": re_,
                "delivered": reach.delivered,
                "undelivered": reach.undelivered,
                "unconfirmed": reach.unconfirmed,
                "percent": _pct(re_, n),
            }
        )
    return {
        "period": period.label, "start": period.start.isoformat(), "end": period.end.isoformat(),
        "runs": runs, "cells": cells, "districts": districts,
    }  # fmt: skip


def departments(store: SqlStore, period: Period) -> dict[str, Any]:
    """Per owning department: campaigns, runs, recipients, sent, delivered, failed by cause, parts sent."""

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

    counts = store.reports.departments(Window(period.start, period.end))
    for owner_runs in counts.runs:
        s = slot(owner_runs.owner)
        s["campaigns"] += owner_runs.campaigns
        s["runs"] += owner_runs.runs
    for sends in counts.sends:
        s = slot(sends.owner)
        s["recipients"] += sends.recipients
        s["sent"] += sends.sent
        s["delivered"] += sends.delivered
        s["parts_sent"] += sends.parts_sent
    for failed in counts.failures:
        s = slot(failed.owner)
        s["failed"] += failed.count
        s["failed_by_cause"][failed.cause] = s["failed_by_cause"].get(failed.cause, 0) + failed.count
    assessor = domain.department(domain.current().assessed_by)
    return {
        "period": period.label,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        # who takes these figures into the annual assessment (organisation.yaml's assessed_by, 三(四))
        "assessed_by": {"department": assessor.id, "name": assessor.name} if assessor else None,
        "departments": list(stats.values()),
    }


def failures(store: SqlStore, period: Period | None = None) -> dict[str, Any]:
    """Rows that did not go out, by error code, gateway and state (``reason`` when there is no code)."""
    rows: list[dict[str, Any]] = [
        {"error_code": f.error_code, "gateway": f.gateway, "state": f.state, "count": f.count}
        for f in store.reports.failures(_window(period))
    ]
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
        "undelivered",
        "unconfirmed",
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
