"""The delivery log: the one face the rest of the package imports.

``SqlStore`` (SQLite, the local default that needs no service, and PostgreSQL) holds an
engine and small operation groups, each in its own module and each owning its tables::

    store.upsert_residents / iter_audience / ...   residents and audiences      (sql.py)
    store.create_run / get_run / list_runs / ...   runs                         (sql.py)
    store.claim / record / release / requeue ...   deliveries and claims        (sql.py)
    store.pause_run / record_fire / acquire_lease  coordination: control, fires,
      / take_fence / heartbeat ...                 leases, fences, heartbeats   (control.py, sql.py)
    store.apply_status / settle_unknown / ...      provider events after hand-over (provider.py)
    store.awaiting_report / mark_unconfirmed       rows whose delivery report is chased (provider.py)
    store.accounts                                 accounts, sessions, login throttle (_accounts.py)
    store.audit                                    ledger verification, event log, audit chain (_audit.py)
    store.reports                                  aggregates for the assessment reports (_reports.py)
    store.dashboard                                reads the dashboard's pages need (_dashboard.py)
    store.traces                                   a delivery's attempts and HTTP traces, trace purge (_traces.py)

Everything else in this package (``sql``, ``control``, ``provider``, ``ledger``, ``schema``,
the ``_``-prefixed modules) is implementation: import from ``dispatcher.store`` only. SQL
stays inside this package; callers get records (dataclasses) and plain values back.
"""

from ._accounts import Credentials, StoredAccount
from ._reports import (
    FAILED_STATES,
    REACHED_STATES,
    CoverageCounts,
    DepartmentCounts,
    FailureCount,
    OwnerFailures,
    OwnerRuns,
    OwnerSends,
    Reach,
    Window,
)
from ._rows import as_utc
from ._traces import StoredAttempt, StoredDelivery, StoredEvent
from .base import (
    CANCELLED,
    DELIVERED,
    EXPIRED,
    FAILED,
    HANDED_OVER_STATES,
    OPEN_STATES,
    PENDING,
    SENDING,
    SENT,
    SKIPPED,
    STATES,
    UNCONFIRMED,
    UNDELIVERED,
    UNKNOWN,
    AudienceFilter,
    Claimed,
    CreatedRun,
    Outcome,
    Resident,
    RunRecord,
    RunSpec,
    UnknownRow,
)
from .control import FireRecord, RecentRun, RunProgress
from .ledger import AUDIT_CHAIN
from .ledger import Break as ChainBreak
from .provider import PROVIDER_STATES, AwaitingReport, StateChange
from .sql import DuplicateRun, LeaseLost, SqlStore, iter_chunks, open_store, utcnow

__all__ = [
    "AUDIT_CHAIN",
    "CANCELLED",
    "DELIVERED",
    "EXPIRED",
    "FAILED",
    "FAILED_STATES",
    "HANDED_OVER_STATES",
    "OPEN_STATES",
    "PENDING",
    "PROVIDER_STATES",
    "REACHED_STATES",
    "SENDING",
    "SENT",
    "SKIPPED",
    "STATES",
    "UNCONFIRMED",
    "UNDELIVERED",
    "UNKNOWN",
    "AudienceFilter",
    "AwaitingReport",
    "ChainBreak",
    "Claimed",
    "CoverageCounts",
    "CreatedRun",
    "Credentials",
    "DepartmentCounts",
    "DuplicateRun",
    "FailureCount",
    "FireRecord",
    "LeaseLost",
    "Outcome",
    "OwnerFailures",
    "OwnerRuns",
    "OwnerSends",
    "Reach",
    "RecentRun",
    "Resident",
    "RunProgress",
    "RunRecord",
    "RunSpec",
    "SqlStore",
    "StateChange",
    "StoredAccount",
    "StoredAttempt",
    "StoredDelivery",
    "StoredEvent",
    "UnknownRow",
    "Window",
    "as_utc",
    "iter_chunks",
    "open_store",
    "utcnow",
]
