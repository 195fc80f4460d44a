"""Delivery-log stores: ``base`` says what the pipeline needs, ``sql`` provides it (SQLite, PostgreSQL)."""

from .base import AudienceFilter, Claimed, Outcome, Resident, RunSpec
from .sql import DuplicateRun, SqlStore, open_store

__all__ = ["AudienceFilter", "Claimed", "DuplicateRun", "Outcome", "Resident", "RunSpec", "SqlStore", "open_store"]
