"""Row-level writes several operation groups share, each inside the caller's transaction.

A state change and its ledger event are written together here, so whichever group moves a
delivery row (a worker's outcome, an operator's cancel, a status callback) the log and the
ledger agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, literal, select
from sqlalchemy.engine import Connection

from ..keys import delivery_key
from ..redact import scrub, scrub_optional
from . import ledger
from . import schema as t
from .base import PENDING, AttemptRow, DeliveryRow, DirectRecipient, RunSpec


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; everything we store is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def rows_of_phone(columns: Sequence[Any], phone: str, keys: Any, *, by_key: bool) -> Any:
    """A select of ``columns`` from ``phone``'s deliveries among ``keys`` (its key in one run, or a select of
    its keys in every run).

    ``by_key`` (SQLite): every key is in a unique index, which finds them. PostgreSQL has no index over
    every key since version 15: it took a tenth of writing a run's rows and of each result's UPDATE. A
    number in the registry is found as its resident, by the unique (resident, run) index: the registry
    holds one resident per number and never renumbers one. A number outside it (resident 0: an alert's, a
    roster's, or one registered after the run) is found by the unique index on the keys of such rows. The
    two parts are disjoint, and each is its own select so that a select of keys joins that index. The
    ``0`` is a constant so that a generic plan can prove each partial index applies; the phone is compared
    on every row found as well.
    """
    d, r = t.deliveries, t.residents
    key_matches = d.c.key == keys if isinstance(keys, str) else d.c.key.in_(keys)
    if by_key:
        return select(*columns).where(key_matches)
    zero: Any = sa.literal_column("0")
    resident = select(r.c.id).where(r.c.phone == phone).scalar_subquery()
    return sa.union_all(
        select(*columns).where(d.c.resident_id == resident, d.c.resident_id != zero, d.c.phone == phone, key_matches),
        select(*columns).where(d.c.resident_id == zero, d.c.phone == phone, key_matches),
    )


_DELIVERY_TIMES = ("claimed_at", "next_attempt_at", "sent_at", "created_at", "updated_at", "confirmed_at")


def delivery_row(row: Any) -> DeliveryRow:
    """A ``deliveries`` row (a mapping of every column) as its record."""
    values = dict(row)
    for key in _DELIVERY_TIMES:
        values[key] = as_utc(values[key])
    return DeliveryRow(**values)


def attempt_row(row: Any) -> AttemptRow:
    """An ``attempts`` row (a mapping of every column) as its record."""
    values = dict(row)
    values["trace_purged_at"] = as_utc(values["trace_purged_at"])
    values["at"] = as_utc(values["at"])
    return AttemptRow(**values)


def insert_run(conn: Connection, spec: RunSpec, now: datetime) -> None:
    """The run row with its snapshot (campaign and template text with their sha256), status creating."""
    conn.execute(
        sa.insert(t.runs).values(
            id=spec.run_id,
            campaign_id=spec.campaign_id,
            title=spec.title,
            owner=spec.owner,
            channel=spec.channel,
            priority=spec.priority,
            reason=scrub_optional(spec.reason),  # an urgent run's reason is free text
            fire_time=spec.fire_time,
            as_of=as_utc(spec.as_of),  # SQLite keeps no offset: store UTC like every timestamp
            status="creating",
            gateway=spec.gateway,
            campaign_path=spec.campaign_path,
            campaign_yaml=spec.campaign_yaml,
            campaign_sha256=spec.campaign_sha256,
            template_name=spec.template_name,
            template_text=spec.template_text,
            template_sha256=spec.template_sha256,
            send_by=spec.send_by,
            batch_size=spec.batch_size,
            created_at=now,
            version_sha256=spec.version_sha256,
            approved_by=spec.approved_by,
            approved_at=spec.approved_at,
            approval_exempt=scrub_optional(spec.approval_exempt),  # an urgent run's reason is free text
        )
    )
    if spec.part_prices:
        conn.execute(
            sa.insert(t.run_prices),
            [{"run_id": spec.run_id, "gateway": name[:32], "price_per_part": p} for name, p in spec.part_prices],
        )


def keys_digest(conn: Connection, run_id: str, *, is_sqlite: bool, after_id: int | None = None) -> str:
    """sha256 of every (key, state) of the run in id order (ledger.keys_digest's format).

    PostgreSQL computes it server-side (no 200,000 rows shipped to Python). SQLite streams the
    lines, made by SQLite itself, a few thousand at a time, so memory stays flat. ``after_id``
    (SQLite only): the largest id before this transaction wrote the run's rows, all of them since,
    so they are read in the table's own order (a range of its rowids) rather than through the
    run's index and a sort of every row (under a profiler, hashing a 100,000-recipient run line by
    line in Python had taken a quarter of its fan-out).
    """
    d = t.deliveries
    if not is_sqlite:
        digest = conn.execute(select(keys_digest_sql(d)).where(d.c.run_id == run_id)).scalar_one()
        return digest or ledger.keys_digest([])
    line = d.c.key + literal("\t") + d.c.state + literal("\n")
    # every row after after_id is this run's: the transaction that wrote them holds SQLite's write lock
    where = d.c.id > after_id if after_id is not None else d.c.run_id == run_id
    h = hashlib.sha256()
    for part in conn.execute(select(line).where(where).order_by(d.c.id)).scalars().partitions(5000):
        h.update("".join(part).encode())
    return h.hexdigest()


def keys_digest_sql(rows: Any) -> Any:
    """PostgreSQL's ``ledger.keys_digest`` of ``rows`` (a table or CTE with id, key and state): the same
    lines in id order, hashed by the server. NULL when there are no rows."""
    line = rows.c.key + literal("\t") + rows.c.state + literal("\n")
    ordered = func.string_agg(line, sa.text("'' ORDER BY id"))
    return func.encode(func.sha256(func.convert_to(ordered, "UTF8")), "hex")


def transition(
    conn: Connection,
    now: datetime,
    ids: Sequence[int],
    from_state: str,
    to_state: str,
    *,
    actor: str,
    reason: str | None = None,
    values: dict[str, Any] | None = None,
    token: str | None = None,
    fence: Sequence[Any] = (),
) -> int:
    """Move rows ``from_state`` -> ``to_state`` and append one ledger event per row moved.

    Every state change outside claim/record goes through here, inside the caller's
    transaction, so the delivery log and the ledger can never disagree. With ``token``,
    only rows still held under that claim move; ``fence`` adds further conditions a row
    must still meet (its claim not renewed since it was read).
    """
    if not ids:
        return 0
    d = t.deliveries
    where = [d.c.id.in_(ids), d.c.state == from_state]
    if token is not None:
        where.append(d.c.claim_token == token)
    where.extend(fence)
    moved = conn.execute(
        sa.update(d)
        .where(*where)
        .values(state=to_state, updated_at=now, **(values or {}))
        .returning(d.c.id, d.c.key, d.c.run_id, d.c.batch_no)
    ).all()
    ledger.append_by_run(
        conn,
        (
            (
                row.run_id,
                ledger.Event(
                    "delivery.state",
                    row.key,
                    row.id,
                    from_state,
                    to_state,
                    reason=reason,
                    actor=actor,
                    batch=row.batch_no,
                ),
            )
            for row in sorted(moved, key=lambda r: r.id)
        ),
        now,
    )
    return len(moved)


def head_payload(spec: RunSpec, total: int, pending: int, digest: str) -> dict[str, Any]:
    """What a run's ``run.created`` event seals: what it was made of, its rows, and its approval.

    One shape for campaign runs and runs over a list of numbers, so ``audit verify`` reads both alike.
    """
    return {
        "campaign_id": spec.campaign_id,
        "campaign_sha256": spec.campaign_sha256,
        "template_name": spec.template_name,
        "template_sha256": spec.template_sha256,
        "fire_time": spec.fire_time.isoformat() if spec.fire_time else None,
        **({"as_of": spec.as_of.isoformat()} if spec.as_of else {}),
        "total": total,
        "pending": pending,
        "keys_sha256": digest,
        **({"reason": scrub(spec.reason)} if spec.reason else {}),
        **({"again_reason": spec.again_reason} if spec.again_reason else {}),
        # the version it was made of and who approved it (or why it needed no approval)
        **approval_seal(spec),
    }


def approval_seal(spec: RunSpec) -> dict[str, str]:
    """What a run's head event seals of its approval: the version and its approver, or why none was needed.

    ``audit verify`` compares these with the run row, so an approval cannot be added afterwards.
    """
    seal: dict[str, str] = {}
    if spec.version_sha256:
        seal["version_sha256"] = spec.version_sha256
    if spec.approved_by:
        seal["approved_by"] = spec.approved_by
    if spec.approval_exempt:
        seal["approval_exempt"] = scrub(spec.approval_exempt)
    return seal


def insert_direct_run(
    conn: Connection, spec: RunSpec, recipients: Sequence[DirectRecipient], now: datetime, *, is_sqlite: bool
) -> tuple[int, int]:
    """A run over a given list of numbers (which need not be in the registry), inside the caller's transaction.

    Written like a campaign's run (snapshot row, one ``pending`` delivery row per number, ``run.created``
    with the keys' digest at the head of its chain), so claims, retries, delivery reports and the ledger
    treat it like any other. A number repeated in the list gets one row. Returns (rows, batches).
    """
    insert_run(conn, spec, now)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for r in recipients:
        if r.phone in seen:
            continue
        seen.add(r.phone)
        rows.append(
            {
                "run_id": spec.run_id,
                "key": delivery_key(spec.run_id, r.phone),
                "resident_id": r.resident_id,
                "phone": r.phone,
                "district": r.district,
                "grid": r.grid,
                "batch_no": len(rows) // spec.batch_size,
                "state": PENDING,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
        )
    if rows:
        conn.execute(sa.insert(t.deliveries), rows)
    batches = (len(rows) + spec.batch_size - 1) // spec.batch_size
    ledger.open_run(
        conn,
        spec.run_id,
        ledger.Event(
            kind="run.created",
            actor=spec.actor,
            payload=head_payload(spec, len(rows), len(rows), keys_digest(conn, spec.run_id, is_sqlite=is_sqlite)),
        ),
        now,
    )
    conn.execute(
        sa.update(t.runs)
        .where(t.runs.c.id == spec.run_id)
        .values(
            total=len(rows),
            batches=batches,
            status="running" if rows else "completed",
            finished_at=None if rows else now,
        )
    )
    return len(rows), batches
