"""What the pipeline needs from a delivery-log store, and the records it passes around.

``SqlStore`` (``store/sql.py``) implements this for SQLite (the local default,
shipped in the package, no service needed) and PostgreSQL. The states a delivery
moves through::

    pending ──claim──> sending ──> sent ──(callback)──> delivered / undelivered
       ^                  │  │       └──(no final report by the deadline)──> unconfirmed ──(late report)──┘
       │                  │  └───> failed (permanent, or attempts exhausted)
       └──retryable───────┘  └───> unknown (ambiguous: reconciled by lookup, never resent blindly)
    pending ──> skipped (opted_out, ...) / cancelled / expired

``unconfirmed`` is final for the run (nothing is sent again) but not for the row: the
provider handed the message on and never said what became of it, so a report that
arrives late may still move it to delivered or undelivered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .. import domain

PENDING = "pending"
SENDING = "sending"
SENT = "sent"
DELIVERED = "delivered"
UNDELIVERED = "undelivered"
FAILED = "failed"
SKIPPED = "skipped"
UNKNOWN = "unknown"
EXPIRED = "expired"
CANCELLED = "cancelled"
UNCONFIRMED = "unconfirmed"

STATES = (
    PENDING, SENDING, SENT, DELIVERED, UNDELIVERED, UNCONFIRMED, FAILED, SKIPPED, UNKNOWN, EXPIRED, CANCELLED,
)  # fmt: skip
#: states in which a row still needs work
OPEN_STATES = (PENDING, SENDING, UNKNOWN)
#: states of a row the gateway accepted: its parts were sent (and paid for) whatever the delivery report says
HANDED_OVER_STATES = (SENT, DELIVERED, UNDELIVERED, UNCONFIRMED)


@dataclass(frozen=True)
class Resident:
    phone: str
    name: str
    district: str
    grid: str
    segments: tuple[str, ...]
    language: str = "zh-CN"
    opted_out: bool = False


@dataclass(frozen=True)
class DirectRecipient:
    """One number of a run made from a list rather than the registry (an alert's resident, a roster).

    ``resident_id`` is the registry's id when the number is known, else 0: the row is then sent with
    no name and no opt-out of its own (the claim joins the registry loosely).
    """

    phone: str
    district: str = ""
    grid: str = ""
    resident_id: int = 0


@dataclass(frozen=True)
class RunSpec:
    """Everything a run snapshots at creation: the campaign and template exactly as they were."""

    run_id: str
    campaign_id: str
    title: str
    owner: str
    channel: str
    priority: str
    reason: str | None
    gateway: str
    campaign_path: str
    campaign_yaml: str
    campaign_sha256: str
    template_name: str
    template_text: str
    template_sha256: str
    send_by: datetime | None
    batch_size: int
    fire_time: datetime | None = None
    signature: str = ""
    opt_out_text: str = ""
    #: who created the run (operator name, "scheduler"), recorded at the head of its ledger
    actor: str = "operator"
    #: the date a manual run is made as of (``--as-of``), which chose its theme
    as_of: datetime | None = None
    #: the operator's reason for running a campaign again within its frequency period
    again_reason: str | None = None
    #: the campaign version (dispatcher/approvals.py) the run is made of, who approved it and when;
    #: or, for a run that needs no approval, why (``approval_exempt``)
    version_sha256: str | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    approval_exempt: str | None = None
    #: CNY per SMS part per provider at creation (DISPATCH_PART_PRICES), kept with the run
    part_prices: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class RunRecord:
    """A run as the delivery log holds it: its snapshot (``RunSpec``) and where it has got to.

    Times are timezone-aware UTC. ``as_dict`` gives the same keys as the ``runs`` table's
    columns, for the output edges (JSON, templates) that print a run whole.
    """

    id: str
    campaign_id: str
    title: str
    owner: str
    channel: str
    priority: str
    reason: str | None
    fire_time: datetime | None
    as_of: datetime | None
    status: str
    gateway: str
    campaign_path: str
    campaign_yaml: str
    campaign_sha256: str
    template_name: str
    template_text: str
    template_sha256: str
    send_by: datetime | None
    batch_size: int
    batches: int
    total: int
    created_at: datetime
    finished_at: datetime | None
    #: tail of the run's ledger chain: last sequence number and its hash
    ledger_seq: int | None
    ledger_hash: str | None
    #: why the run stopped by itself (its outbox or delivery log could not be written); cleared by resume
    halted: str | None
    #: the campaign version it was made of and its approval, or why it needed none (None: made before approvals)
    version_sha256: str | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    approval_exempt: str | None = None
    #: how many per-batch ledger chains the run has (None: made before them, one chain)
    batch_chains: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeliveryRow:
    """One row of a run's delivery log (the ``deliveries`` table), as ``SqlStore.deliveries`` streams it.

    Field names are the table's columns, so ``attempts`` is how many tries were made (the tries
    themselves are ``AttemptRow``s). Times are timezone-aware UTC.
    """

    id: int
    run_id: str
    #: idempotency key: run + phone
    key: str
    resident_id: int
    phone: str
    district: str
    grid: str
    batch_no: int
    state: str
    reason: str | None
    attempts: int
    gateway: str | None
    provider_id: str | None
    error_code: str | None
    error_message: str | None
    parts: int | None
    encoding: str | None
    body: str | None
    claim_token: str | None
    claimed_by: str | None
    claimed_at: datetime | None
    next_attempt_at: datetime | None
    sent_at: datetime | None
    created_at: datetime
    updated_at: datetime
    #: voice calls: when the listener pressed 1 to confirm the warning; None otherwise
    confirmed_at: datetime | None = None


@dataclass(frozen=True)
class AttemptRow:
    """One hand-over to a gateway (the ``attempts`` table), as ``SqlStore.attempts_for`` returns it.

    ``trace`` is the redacted JSON list of exchanges as stored: None when purged (then
    ``trace_purged_at`` says when) or never recorded. Times are timezone-aware UTC.
    """

    id: int
    delivery_id: int
    run_id: str
    attempt: int
    gateway: str
    outcome: str
    provider_id: str | None
    error_code: str | None
    error_message: str | None
    trace: str | None
    trace_purged_at: datetime | None
    at: datetime


@dataclass(frozen=True)
class AudienceFilter:
    """Who a campaign selects: residents of ``districts``, where a district with listed ``grids`` is
    narrowed to those grids and every other selected district is taken whole; then the segments."""

    districts: tuple[str, ...]
    grids: tuple[str, ...] = ()
    segments: tuple[str, ...] = ()
    exclude_segments: tuple[str, ...] = ()

    def whole_districts(self) -> tuple[str, ...]:
        """The selected districts none of whose grids is listed."""
        narrowed = {d.id for grid in self.grids if (d := domain.district_of_grid(grid)) is not None}
        return tuple(d for d in self.districts if d not in narrowed)


@dataclass(slots=True)  # per recipient: not frozen (see providers.base.OutgoingMessage)
class Claimed:
    """A delivery row claimed by a worker for sending, with what is needed to render it."""

    id: int
    key: str
    run_id: str
    phone: str
    name: str
    district: str
    grid: str
    attempts: int
    opted_out: bool
    claimed_at: datetime | None = None
    #: the claim this row was taken under: releasing, re-queueing and recording are fenced on it,
    #: so a stale resume cannot take a row a live worker holds, and a worker whose row was taken
    #: away cannot overwrite whoever holds it now
    claim_token: str | None = None
    #: the row's batch: its ledger chain (saves looking it up when its result is recorded)
    batch: int | None = None
    #: whom the row is for: the frequency cap counts a person's bulk messages by it
    resident_id: int | None = None


@dataclass(frozen=True)
class CreatedRun:
    """What creating a run wrote: its id, its rows (all of them, and those still to send), its batches."""

    run_id: str
    total: int
    pending: int
    batches: int
    #: when ``runs.start_run`` began enqueueing the batches (``time.time()``): workers may start from
    #: here, and the benchmarks time the fan-out from it
    enqueue_started_at: float | None = None


@dataclass(frozen=True)
class UnknownRow:
    """A row an ambiguous reply left ``unknown``, with what a lookup at the provider needs."""

    id: int
    key: str
    phone: str
    body: str | None
    attempts: int
    claimed_at: datetime | None
    updated_at: datetime | None


@dataclass
class Outcome:
    """What happened to one claimed row; written back in bulk at the end of a batch."""

    id: int
    run_id: str
    state: str
    attempt: int
    gateway: str
    outcome: str
    provider_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    reason: str | None = None
    parts: int | None = None
    encoding: str | None = None
    body: str | None = None
    next_attempt_at: datetime | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)
    #: opt the recipient out in the registry (gateway said they sent STOP)
    opt_out_phone: str | None = None
    #: the row's idempotency key, for its ledger event (saves reading it back on every batch)
    key: str | None = None
    #: the claim the outcome belongs to (None: not fenced, e.g. an operator's verdict)
    claim_token: str | None = None
    #: providers of a failover list that proved they took nothing before ``gateway`` answered
    #: (gateway, error_code, error_message, trace): each is kept as an attempt ``refused``
    refusals: list[dict[str, Any]] = field(default_factory=list)
    #: the row's batch, when the caller has it: the ledger chain its event goes to (read otherwise)
    batch: int | None = None
