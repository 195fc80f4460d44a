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
- A run belongs to a period by its fire time (scheduled runs) or else its
  creation time, in Asia/Shanghai.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, TextIO

from . import domain
from .audit import LOCAL_TZ
from .costs import cny
from .errors import UsageError
from .store import QuarterReach, Reach, SqlStore, Window
from .targets import QUARTERS, Target, Targets, Unit, units

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


def departments(store: SqlStore, period: Period, prices_now: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per owning department: campaigns, runs, recipients, sent, delivered, failed by cause, parts sent, spend.

    Spend (CNY) is the parts each provider accepted times the price recorded with the run
    (``prices_now``, i.e. DISPATCH_PART_PRICES, only for runs made before prices were recorded),
    in total and per quarter.
    """

    def empty(key: str, name: str) -> dict[str, Any]:
        return {
            "department": key, "name": name, "campaigns": 0, "runs": 0, "recipients": 0, "sent": 0,
            "delivered": 0, "failed": 0, "failed_by_cause": {}, "parts_sent": 0, "spend_cny": 0.0,
            "spend_by_quarter": {},
        }  # fmt: skip

    # every department appears, even one that ran nothing: the assessment (考核) must show the zero
    stats: dict[str, dict[str, Any]] = {dep.id: empty(dep.id, dep.name) for dep in domain.DEPARTMENTS}

    def slot(owner: str) -> dict[str, Any]:
        dep = domain.department(owner)
        key = dep.id if dep else owner
        return stats.setdefault(key, empty(key, key))

    counts = store.reports.departments(Window(period.start, period.end))
    for spend in store.reports.spend(Window(period.start, period.end), dict(prices_now or {})):
        s = slot(spend.owner)
        s["spend_cny"] += spend.cost
        quarter = quarter_of(spend.when)
        s["spend_by_quarter"][quarter] = s["spend_by_quarter"].get(quarter, 0.0) + spend.cost
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
    for s in stats.values():
        s["spend_cny"] = cny(s["spend_cny"])
        s["spend_by_quarter"] = {q: cny(v) for q, v in sorted(s["spend_by_quarter"].items())}
    return {
        "period": period.label,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "departments": list(stats.values()),
    }


def parse_year(text: str) -> int:
    if not re.fullmatch(r"\d{4}", text.strip()):
        raise UsageError(f"--year: expected a year such as 2021, got {text!r}", field="year")
    return int(text)


def needed(share: float, eligible: int) -> int:
    """Residents that must be reached for ``share`` of ``eligible``: rounded up, in decimal (0.9 x 10 is 9)."""
    return int((Decimal(str(share)) * eligible).to_integral_value(rounding=ROUND_CEILING))


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def assessment(
    store: SqlStore, year: int, targets: Targets, prices_now: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Every town and group-owning department per quarter of ``year``, scored against ``targets``.

    - **eligible**: residents it answers for, in the registry now and not opted out (a department:
      anyone in at least one group it owns, once; a town: its district's residents);
    - **reached**: of those, residents with a delivery row ``sent`` or ``delivered`` in an SMS run of the
      quarter (by fire, else creation, time in Asia/Shanghai), whoever owned the run; ``coverage`` =
      reached / eligible. Rows never confirmed (``unconfirmed``) do not count, unlike ``coverage``'s
      "reached";
    - **pushes**: distinct runs of the quarter that reached at least one of them (a town: a row
      naming its district);
    - **met**: reached >= the target share of eligible (rounded up) and pushes >= the target's;
      **shortfall**: residents still to reach, in total, by group and by district;
    - **spend**: CNY of the parts providers accepted in runs the unit owned, at the run's prices.
    A unit without a target for that quarter is listed with ``met`` null.
    """
    quarters = [parse_period(f"{year}{q}") for q in QUARTERS]
    counts = store.reports.assessment([Window(p.start, p.end) for p in quarters], [s.id for s in domain.SEGMENTS])
    spends = store.reports.spend(Window(quarters[0].start, quarters[-1].end), dict(prices_now or {}))
    empty = QuarterReach(0, (0, 0, 0, 0))

    def add(reaches: Iterable[QuarterReach]) -> QuarterReach:
        listed = list(reaches)
        return QuarterReach(
            sum(x.eligible for x in listed), tuple(sum(x.reached[i] for x in listed) for i in range(len(QUARTERS)))
        )

    owner_of = {s.id: s.owner for s in domain.SEGMENTS}
    # every figure is a sum over (district, set of groups) profiles, so a resident in several groups
    # counts once in a district's or an owner's total and once in each of their groups
    in_district: dict[str, list[QuarterReach]] = defaultdict(list)
    in_cell: dict[tuple[str, str], list[QuarterReach]] = defaultdict(list)
    in_owner: dict[tuple[str, str], list[QuarterReach]] = defaultdict(list)
    for p in counts.profiles:
        in_district[p.district].append(p.reach)
        for seg in p.segments:
            in_cell[(p.district, seg)].append(p.reach)
        for owner in {owner_of[seg] for seg in p.segments if seg in owner_of}:
            in_owner[(owner, p.district)].append(p.reach)
    districts_ = {k: add(v) for k, v in in_district.items()}
    cells = {k: add(v) for k, v in in_cell.items()}
    owners = {k: add(v) for k, v in in_owner.items()}
    pushes: dict[tuple[str, int], set[str]] = defaultdict(set)
    for run_id, dist in counts.run_districts:
        pushes[(dist, counts.runs[run_id])].add(run_id)
    for run_id, seg in counts.run_segments:
        if seg in owner_of:
            pushes[(owner_of[seg], counts.runs[run_id])].add(run_id)
    spent: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0])
    for sp in spends:
        slot = spent[(sp.owner, int(quarter_of(sp.when)[-1]) - 1)]
        slot[0] += sp.parts
        slot[1] += sp.cost

    def parts_of(unit: Unit) -> tuple[list[tuple[str, str, QuarterReach]], list[tuple[str, str, QuarterReach]]]:
        """(by group, by district) of a unit: id, name, reach."""
        if unit.kind == "town":
            groups = [(s.id, s.name, cells.get((unit.id, s.id), empty)) for s in domain.SEGMENTS]
            return groups, [(unit.id, unit.name, districts_.get(unit.id, empty))]
        names = {s.id: s.name for s in domain.SEGMENTS}
        groups = [
            (seg, names[seg], add(cells.get((d.id, seg), empty) for d in domain.DISTRICTS)) for seg in unit.segments
        ]
        return groups, [(d.id, d.name, owners.get((unit.id, d.id), empty)) for d in domain.DISTRICTS]

    def score(target: Target | None, reach: QuarterReach, qi: int) -> dict[str, Any]:
        need = needed(target.coverage, reach.eligible) if target else None
        reached = reach.reached[qi]
        return {
            "eligible": reach.eligible,
            "reached": reached,
            "coverage": _ratio(reached, reach.eligible),
            "shortfall": max(0, need - reached) if need is not None else None,
        }

    rows = []
    for qi, q in enumerate(QUARTERS):
        for unit in units():
            target = targets.target(year, q, unit.id)
            groups, districts = parts_of(unit)
            total = districts_.get(unit.id, empty) if unit.kind == "town" else add(r for _, _, r in districts)
            scored = score(target, total, qi)
            n_pushes = len(pushes.get((unit.id, qi), ()))
            by_group = [{"segment": i, "name": n, **score(target, r, qi)} for i, n, r in groups]
            by_district = [{"district": i, "name": n, **score(target, r, qi)} for i, n, r in districts]
            met = None
            if target is not None:
                met = scored["shortfall"] == 0 and n_pushes >= target.pushes
            parts, cost = spent.get((unit.id, qi), (0, 0.0))
            rows.append({
                "quarter": f"{year}{q}", "unit": unit.id, "name": unit.name, "kind": unit.kind, **scored,
                "target_coverage": target.coverage if target else None, "pushes": n_pushes,
                "target_pushes": target.pushes if target else None, "met": met,
                "shortfall_by_group": {g["segment"]: g["shortfall"] for g in by_group if g["shortfall"]},
                "shortfall_by_district": {d["district"]: d["shortfall"] for d in by_district if d["shortfall"]},
                "by_group": by_group, "by_district": by_district, "parts": int(parts), "spend_cny": cny(cost),
            })  # fmt: skip
    spend = []
    for (owner, qi), (parts, cost) in sorted(spent.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        dep = domain.department(owner) or domain.district(owner)
        spend.append({"quarter": f"{year}{QUARTERS[qi]}", "owner": owner, "name": dep.name if dep else owner,
                      "parts": int(parts), "spend_cny": cny(cost)})  # fmt: skip
    total_spend = cny(sum(c for _, c in spent.values()))
    return {
        "year": year, "targets": str(targets.path), "targets_year": targets.year_in_force(year),
        "runs": len(counts.runs), "rows": rows, "spend": spend, "total_spend_cny": total_spend,
    }  # fmt: skip


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
        "spend_cny",
        "spend_by_quarter",
    ),
    "assessment": (
        "quarter",
        "unit",
        "name",
        "kind",
        "eligible",
        "reached",
        "coverage",
        "target_coverage",
        "pushes",
        "target_pushes",
        "met",
        "shortfall",
        "shortfall_by_group",
        "shortfall_by_district",
        "parts",
        "spend_cny",
    ),
    "failures": ("error_code", "gateway", "state", "count"),
}


def rows_of(kind: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    return report[
        {"coverage": "cells", "departments": "departments", "failures": "failures", "assessment": "rows"}[kind]
    ]


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else value


def write_csv(kind: str, report: dict[str, Any], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    columns = CSV_COLUMNS[kind]
    writer.writerow(columns)
    for row in rows_of(kind, report):
        writer.writerow([_csv_value(row[c]) for c in columns])
