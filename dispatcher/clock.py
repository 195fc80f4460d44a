"""Clocks: the real one, one shifted by a fixed offset, and one tests set by hand.

Everything that asks "what time is it" for business rules (send windows, send_by,
frequency caps, schedule fires) takes the ``Runtime.clock``, so tests and drills can
put a whole process at 22:00 or in another quarter without sleeping through it.
Pacing (rate limits, leases) deliberately uses real time: it is about the real
gateway and real processes, not about the calendar.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def offset_clock(seconds: float) -> Clock:
    """The real clock shifted by ``seconds``: every process given the same offset agrees on the time."""
    delta = timedelta(seconds=seconds)

    def now() -> datetime:
        return datetime.now(UTC) + delta

    return now


class SettableClock:
    """A clock that runs at real speed from a time a test sets, and can be moved while in use."""

    def __init__(self, start: datetime) -> None:
        self._lock = threading.Lock()
        self._offset = start - datetime.now(UTC)

    def set(self, when: datetime) -> None:
        with self._lock:
            self._offset = when - datetime.now(UTC)

    def __call__(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset
