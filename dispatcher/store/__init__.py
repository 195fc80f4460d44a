"""The delivery log: the one face the rest of the package imports.

``SqlStore`` (SQLite, the local default that needs no service, and PostgreSQL) holds an
engine, its own core operations, and operation groups reached as attributes, each in its
own module and each owning its tables and queries::

    SqlStore itself (sql.py): the core of a run's life
      migrate / schema_version / server_secret / close        the log itself
      upsert_residents / set_opted_out / audience_stats
        / iter_audience / audience_matrix                     residents and audiences
      create_run / get_run / list_runs / set_run_status
        / finish_if_done                                      runs
      pending_batches / claim / next_retry_at / batch_left / record
        / release / still_claimed / renew_claim / requeue / orphans
        / sending_holders / operator_settle / cancel_open     deliveries and claims
      heartbeat / forget_worker / live_workers                workers' heartbeats
      counts / by_district / by_gateway / parts_sent
        / deliveries / attempts_for                           reading a run's rows (DeliveryRow, AttemptRow)
    store.control (control.py: RunControl)
      pause_run / unpause_run / halt_run / clear_halt / run_halted / cancel_claimed
      run_status / progress / running_runs                    what workers and the watchdog poll
    store.coordination (control.py: Coordination)
      operator_lock                                           one operator command per campaign
      acquire_lease / release_lease / take_fence              the scheduler's leadership
      record_fire / last_fire / fire_recorded / list_fires
        / run_for_fire                                        the scheduler's fires
      get_marker / set_marker                                 small named values (broker sentinel)
      bulk_sends_since / recent_runs                          cross-run reads: frequency cap, repeats
    store.provider_events (provider.py: ProviderEvents)
      apply_status / drain_status_backlog / state_of          delivery reports, forward only
      apply_statuses                                          many reports in one transaction
      unknown_rows / settle_unknown / mark_unknown            reconciling ambiguous hand-overs
      runs_awaiting_reports / awaiting_report
        / mark_unconfirmed                                    chasing final reports that never came
    store.ringback (provider.py: Ringback)
      keep_ringback / ringback_kept / create_restore_run      what an enrolment changed, and its restore
    store.accounts   (_accounts.py)                           accounts, sessions, login throttle
    store.approvals  (_approvals.py)                          two-person approval of campaign versions
    store.audit      (_audit.py)                              ledger verification, event log, audit chain
    store.reports    (_reports.py)                            aggregates for the reports: coverage, departments
                                                              and spend, failures, the annual assessment
    store.dashboard  (_dashboard.py)                          reads the dashboard's pages need
    store.traces     (_traces.py)                             a delivery's attempts and HTTP traces, trace purge
    store.alerts     (_alerts.py)                             early-warning alerts, their steps and chains,
                                                              the roster, API keys

Groups share only the connection plumbing (``_db.Db``), the row helpers in ``_rows`` and the batch
leases in ``_leases`` (a claim holds a batch by one lease row; whoever else acts on its rows turns
it into rows in ``sending`` first, and whoever counts counts its rows as ``sending``); none
calls another's private methods. Everything else in this package (``sql``, ``control``,
``provider``, ``ledger``, ``schema``, the ``_``-prefixed modules) is implementation: import
from ``dispatcher.store`` only. SQL stays inside this package; callers get records
(dataclasses) and plain values back.
"""

from ._accounts import Credentials, StoredAccount
from ._alerts import AlertRecord, AlertStep, Milestone, NewAlert, RosterEntry
from ._approvals import ApprovalRow, ApprovalState
from ._reports import (
    ASSESSED_STATES,
    FAILED_STATES,
    REACHED_STATES,
    AssessmentCounts,
    CoverageCounts,
    DepartmentCounts,
    FailureCount,
    OwnerFailures,
    OwnerRuns,
    OwnerSends,
    Profile,
    QuarterReach,
    Reach,
    RunSpend,
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
    AttemptRow,
    AudienceFilter,
    Claimed,
    CreatedRun,
    DeliveryRow,
    DirectRecipient,
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
    "ASSESSED_STATES",
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
    "AlertRecord",
    "AlertStep",
    "ApprovalRow",
    "ApprovalState",
    "AssessmentCounts",
    "AttemptRow",
    "AudienceFilter",
    "AwaitingReport",
    "ChainBreak",
    "Claimed",
    "CoverageCounts",
    "CreatedRun",
    "Credentials",
    "DeliveryRow",
    "DepartmentCounts",
    "DirectRecipient",
    "DuplicateRun",
    "FailureCount",
    "FireRecord",
    "LeaseLost",
    "Milestone",
    "NewAlert",
    "Outcome",
    "OwnerFailures",
    "OwnerRuns",
    "OwnerSends",
    "Profile",
    "QuarterReach",
    "Reach",
    "RecentRun",
    "Resident",
    "RosterEntry",
    "RunProgress",
    "RunRecord",
    "RunSpec",
    "RunSpend",
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
