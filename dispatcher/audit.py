"""What auditors ask of the delivery log: is it intact, and who was sent what, when, with what result.

``verify`` recomputes every hash chain (store/ledger.py) and cross-checks the
deliveries table against it. ``iter_log`` streams ledger events joined with their
delivery and run, filtered, in keyset pages: a million rows go out without ever
being held in memory. Phone numbers are masked unless the caller unmasks, and an
unmasked export, and every search by phone number, is itself appended to the
``audit`` chain (who, when, which filter) *before* the first row leaves, so an
interrupted export is still on record. The number searched is recorded masked,
with a keyed HMAC (server secret, ``phone_key``) to match searches on: a plain hash
of an 11-digit number is reversed by trying them all.

CSV cells that a spreadsheet would run as a formula (starting with ``=``, ``+``,
``-``, ``@``, tab or carriage return) are prefixed with ``'`` (OWASP's rule); only
a phone cell that is exactly ``+`` and digits is left as it is, so an unmasked
export still holds numbers that can be dialled.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, time
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from . import domain
from .errors import UsageError
from .phones import InvalidPhone, mask, mask_text, normalise
from .redact import scrub
from .store import AUDIT_CHAIN, STATES, ChainBreak, SqlStore

#: the programme's local time: periods, dates typed without a zone and the dashboard use it
LOCAL_TZ = ZoneInfo("Asia/Shanghai")

LOG_COLUMNS = (
    "event_id", "delivery_id", "at", "run_id", "campaign_id", "owner", "key", "phone", "district", "grid",
    "from_state", "to_state", "gateway", "provider_id", "error_code", "reason", "actor",
)  # fmt: skip
FORMATS = ("table", "csv", "jsonl")


# ------------------------------------------------------------------ verify


@dataclass(frozen=True)
class ChainResult:
    chain: str
    events: int
    problem: ChainBreak | None


def verify(store: SqlStore, run_id: str | None = None) -> Iterator[ChainResult]:
    """Verify one run's chain, or every run's, the audit chain and every alert's; yields one result per chain."""
    if run_id is not None:
        store.get_run(run_id)  # unknown id -> UsageError (exit 2)
    for rid in store.audit.run_ids(run_id):
        events, problem = store.audit.verify_run(rid)
        yield ChainResult(rid, events, problem)
    if run_id is None:
        events, problem = store.audit.verify_audit_chain()
        yield ChainResult(AUDIT_CHAIN, events, problem)
        # every early-warning alert keeps its own chain (created, steps fired, milestones, closed)
        for chain_id in store.alerts.chain_ids():
            events, problem = store.audit.verify_side_chain(chain_id)
            yield ChainResult(chain_id, events, problem)


# ------------------------------------------------------------------ filters


@dataclass(frozen=True)
class LogFilter:
    """What ``dispatch audit log`` and the dashboard's ledger search narrow the events to."""

    campaign: str | None = None
    run: str | None = None
    district: str | None = None
    segment: str | None = None
    state: str | None = None
    error_code: str | None = None
    phone: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, **raw: str | None) -> LogFilter:
        """Build from text (CLI options, query strings); a bad value is a ``UsageError`` naming the option."""
        values: dict[str, Any] = {k: (v.strip() if isinstance(v, str) else v) or None for k, v in raw.items()}
        if values.get("district"):
            d = domain.district(values["district"])
            if d is None:
                raise UsageError(
                    f"unknown district {values['district']!r}; known: {domain.district_names()}",
                    field="district",
                )
            values["district"] = d.id
        if values.get("segment"):
            s = domain.segment(values["segment"])
            if s is None:
                raise UsageError(
                    f"unknown segment {values['segment']!r}; known: {domain.segment_names()}", field="segment"
                )
            values["segment"] = s.id
        if values.get("state") and values["state"] not in STATES:
            raise UsageError(f"unknown state {values['state']!r}; known: {', '.join(STATES)}", field="state")
        if values.get("phone"):
            try:
                values["phone"] = normalise(values["phone"])
            except InvalidPhone as exc:
                raise UsageError(f"{exc} (give the exact number)", field="phone") from exc
        for name in ("since", "until"):
            if values.get(name):
                values[name] = parse_time(values[name], name, end=name == "until")
        return cls(**values)

    def describe(self, key: bytes) -> dict[str, Any]:
        """The filter as recorded in the ledger: the number searched masked, with a keyed digest to match on.

        ``key`` is the server's secret (``phone_key``): without it the digest cannot be
        reversed by hashing every possible number.
        """
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if v is not None}
        if self.phone:
            out["phone"] = mask(self.phone)
            out["phone_hmac"] = phone_hmac(key, self.phone)
        for name in ("since", "until"):
            if name in out:
                out[name] = out[name].isoformat()
        return out


def phone_key(store: SqlStore) -> bytes:
    """The server secret that keys phone digests, made once per delivery log and kept in it."""
    return store.server_secret("phone_hmac_key")


def phone_hmac(key: bytes, phone: str) -> str:
    return hmac.new(key, phone.encode("utf-8"), hashlib.sha256).hexdigest()


def parse_time(text: str, name: str, *, end: bool = False) -> datetime:
    """``2021-03-31`` (a local day; as an upper bound the whole day) or an ISO time; naive = Asia/Shanghai."""
    try:
        if len(text) == 10:
            day = datetime.fromisoformat(text).date()
            value = datetime.combine(day, time.max if end else time.min, LOCAL_TZ)
        else:
            value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--{name}: expected a date (2021-03-31) or ISO time, got {text!r}", field=name) from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=LOCAL_TZ)
    return value.astimezone(UTC)


def iter_log(
    store: SqlStore, f: LogFilter, *, unmask: bool = False, limit: int | None = None, chunk: int = 5000
) -> Iterator[dict[str, Any]]:
    """Stream matching events (oldest first) as flat dicts, one keyset page in memory at a time."""
    for item in store.audit.events(f, limit=limit, chunk=chunk):
        item["at"] = item["at"].isoformat()
        if not unmask:
            item["phone"] = mask(item["phone"])
            item["key"] = mask_text(item["key"] or "")
            # provider ids may embed the number (the outbox's do); never let one through masked output
            item["provider_id"] = mask_text(item["provider_id"]) if item["provider_id"] else None
            # reasons are masked when written; rows written before that are masked here
            item["reason"] = scrub(item["reason"]) if item["reason"] else item["reason"]
        yield item


def record_export(store: SqlStore, *, actor: str, f: LogFilter, fmt: str, via: str) -> None:
    """Append an ``audit.export`` event to the audit chain: who unmasked which numbers, when, how."""
    _record(store, "audit.export", actor=actor, f=f, fmt=fmt, via=via)


def record_search(store: SqlStore, *, actor: str, f: LogFilter, fmt: str, via: str) -> None:
    """Append an ``audit.search`` event: who looked a number up in the ledger (masked output too).

    A search by exact number tells the searcher whether that number got a message, so a
    masked number can be recovered by trying candidates; each search is on record instead.
    """
    _record(store, "audit.search", actor=actor, f=f, fmt=fmt, via=via)


def record_access(store: SqlStore, *, actor: str, f: LogFilter, unmask: bool, fmt: str, via: str) -> None:
    """Record what must be on record about a ledger query: an unmasked export, or a search by phone."""
    if unmask:
        record_export(store, actor=actor, f=f, fmt=fmt, via=via)
    elif f.phone:
        record_search(store, actor=actor, f=f, fmt=fmt, via=via)


def _record(store: SqlStore, kind: str, *, actor: str, f: LogFilter, fmt: str, via: str) -> None:
    payload = {"filter": f.describe(phone_key(store)), "format": fmt, "via": via}
    store.audit.append(kind, actor=actor, payload=payload)


def audit_events(store: SqlStore, limit: int = 100) -> list[dict[str, Any]]:
    """The newest audit-chain events (unmasked exports, searches by phone), for the CLI and the dashboard."""
    return [{**row, "at": row["at"].isoformat()} for row in store.audit.recent(limit)]


#: what a spreadsheet reads as the start of a formula (OWASP CSV injection)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_E164 = re.compile(r"^\+\d{1,15}$")


def csv_cell(column: str, value: Any) -> str:
    """A cell a spreadsheet shows as text: formula starters get a leading ``'``.

    A phone cell that is exactly an E.164 number is left whole (Excel reads ``+86...`` as
    a number, not a formula, and an unmasked export must hold numbers that can be dialled).
    """
    text = "" if value is None else str(value)
    if column == "phone" and _E164.match(text):
        return text
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def write_rows(rows: Iterator[dict[str, Any]], fmt: str, out: TextIO) -> int:
    """Write streamed rows as CSV or JSON lines; returns how many were written."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(LOG_COLUMNS)
        for row in rows:
            writer.writerow([csv_cell(c, row[c]) for c in LOG_COLUMNS])
            n += 1
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    else:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", field="format")
    return n
