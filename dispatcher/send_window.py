"""When bulk messages may go out: the campaign's daily hours in its own time zone.

A batch that reaches a worker outside the window is neither sent nor dropped: the
worker computes the next opening from the injected clock and re-enqueues the batch
with that delay. Urgent campaigns (which must state a reason) ignore the window.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from .campaigns import Campaign, SendWindow


def _t(text: str) -> time:
    hour, minute = text.split(":")
    return time(int(hour), int(minute))


def is_open(window: SendWindow, zone: ZoneInfo, when: datetime) -> bool:
    """True if ``when`` is inside the daily window (start inclusive, end exclusive)."""
    local = when.astimezone(zone).time()
    start, end = _t(window.start), _t(window.end)
    if start < end:
        return start <= local < end
    return local >= start or local < end  # window across midnight


def next_opening(window: SendWindow, zone: ZoneInfo, when: datetime) -> datetime:
    """The first instant at or after ``when`` at which the window is open."""
    if is_open(window, zone, when):
        return when
    local = when.astimezone(zone)
    start = _t(window.start)
    candidate = datetime.combine(local.date(), start, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), start, tzinfo=zone)
    return candidate


def campaign_may_send(campaign: Campaign, priority: str, when: datetime) -> datetime | None:
    """None if a message of this run may go out at ``when``; otherwise when it may."""
    if priority == "urgent":
        return None
    opening = next_opening(campaign.send_window, campaign.zone(), when)
    return None if opening == when else opening
