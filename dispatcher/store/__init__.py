"""The delivery log: ``base`` says what the pipeline needs, ``sql`` provides it (SQLite, PostgreSQL)."""

from ._accounts import Credentials, StoredAccount
from ._reports import (
    FAILED_STATES,
    REACHED_STATES,
    CoverageCounts,
    DepartmentCounts,
    FailureCount,
    Reach,
    Window,
)
from .base import OPEN_STATES, STATES, AudienceFilter, Claimed, Outcome, Resident, RunSpec
from .ledger import AUDIT_CHAIN
from .ledger import Break as ChainBreak
from .sql import DuplicateRun, SqlStore, open_store

__all__ = [
    "AUDIT_CHAIN",
    "FAILED_STATES",
    "OPEN_STATES",
    "REACHED_STATES",
    "STATES",
    "AudienceFilter",
    "ChainBreak",
    "Claimed",
    "CoverageCounts",
    "Credentials",
    "DepartmentCounts",
    "DuplicateRun",
    "FailureCount",
    "Outcome",
    "Reach",
    "Resident",
    "RunSpec",
    "SqlStore",
    "StoredAccount",
    "Window",
    "open_store",
]
