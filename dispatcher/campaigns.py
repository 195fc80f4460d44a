"""Campaign files: YAML parsed with line numbers, validated with pydantic, checked against the world.

Three layers, each reporting ``path:line:column: field: message``:

1. YAML syntax (PyYAML's marks give the position);
2. the schema (pydantic; each error's ``loc`` is mapped back to the YAML node it came from);
3. the world: districts, segments and departments exist (organisation.yaml), the owner
   and co-owners are responsible for the groups and districts targeted, templates exist
   and parse, every variable a template reads is given, and the message can fit 500
   characters; the schedule ends after it starts, lies within the campaign's plan period
   (themes.yaml) and its themes cover every quarter it fires in.

``load_campaign`` stops at the first error; ``check_paths`` collects every error of
every file so that ``dispatch validate`` can show them all at once.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import domain, safeyaml, themes
from .charcheck import LINE_BREAKS, first_bad_text
from .errors import CampaignError, InputError, TemplateError, UsageError
from .sms import MAX_MESSAGE_CHARS
from .templates import BUILTIN_NAMES, SAMPLE_RECIPIENT, Composer, TemplateSource, load, undeclared
from .themes import Plan

DEFAULT_SIGNATURE = "【常州经开区反诈中心】"
DEFAULT_OPT_OUT = "回T退订"
QUARTERS = ("Q1", "Q2", "Q3", "Q4")
SCHEDULE_KINDS = ("cron", "quarterly", "yearly", "interval")
_HHMM_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,63}$")
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def quarter_of(when: datetime) -> str:
    """``Q1`` .. ``Q4`` of a (local) date."""
    return f"Q{(when.month - 1) // 3 + 1}"


def parse_duration(text: str) -> timedelta:
    """``5s``, ``10m``, ``1h``, ``1d``, ``2w`` -> timedelta."""
    match = _DURATION_RE.match(str(text))
    if not match:
        raise ValueError(f"expected a duration such as 5s, 10m, 1h, 1d or 2w, got {text!r}")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hhmm(value: str) -> str:
    if not _HHMM_RE.match(str(value)):
        raise ValueError(f"expected HH:MM, got {value!r}")
    return value


class Audience(_Model):
    districts: list[str] | Literal["all"] = "all"
    grids: list[str] = Field(default_factory=list)
    segments: list[str] = Field(default_factory=list)
    exclude_segments: list[str] = Field(default_factory=list)

    @field_validator("districts", mode="before")
    @classmethod
    def _one_district(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("grids")
    @classmethod
    def _grid_codes(cls, value: list[str]) -> list[str]:
        # the registry stores grid codes upper-case (HL-03); hl-03 in a campaign means the same grid
        return [g.strip().upper() for g in value]

    def district_ids(self) -> list[str]:
        if self.districts == "all":
            return [d.id for d in domain.DISTRICTS]
        return [d.id for name in self.districts if (d := domain.district(name))]

    def segment_ids(self) -> list[str]:
        return [s.id for name in self.segments if (s := domain.segment(name))]

    def excluded_segment_ids(self) -> list[str]:
        return [s.id for name in self.exclude_segments if (s := domain.segment(name))]


_AT_HELP = "HH:MM, local time in the schedule's timezone"
#: the fewest days each month has in any year (February: 28, so a date fires every year)
_SHORTEST_MONTH = {1: 31, 2: 28, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}


class Quarterly(_Model):
    """Once a quarter, on the same day of the same month of every quarter."""

    month: int = Field(1, ge=1, le=3, description="1-3, the month within each quarter (1 = Jan/Apr/Jul/Oct)")
    day: int = Field(1, ge=1, le=31, description="1-31, the day of that month")
    at: str = Field("09:00", description=_AT_HELP)

    @field_validator("at")
    @classmethod
    def _time(cls, value: str) -> str:
        return _hhmm(value)

    @model_validator(mode="after")
    def _day_in_every_quarter(self) -> Quarterly:
        # a cron day that a month lacks is silently skipped: {month: 2, day: 30} would never fire in Q1
        shortest = {1: 30, 2: 28, 3: 30}[self.month]  # Jan/Apr/Jul/Oct, Feb/May/Aug/Nov, Mar/Jun/Sep/Dec
        if self.day > shortest:
            raise ValueError(f"day {self.day} does not exist in every quarter's month {self.month}; use 1-{shortest}")
        return self


class Yearly(_Model):
    """Once a year, on one date (e.g. the start of the summer holidays)."""

    month: int = Field(ge=1, le=12, description="1-12, the month of the year")
    day: int = Field(ge=1, le=31, description="1-31, the day of that month")
    at: str = Field("09:00", description=_AT_HELP)

    @field_validator("at")
    @classmethod
    def _time(cls, value: str) -> str:
        return _hhmm(value)

    @model_validator(mode="after")
    def _day_in_month(self) -> Yearly:
        # a date that a year lacks is silently skipped by cron: 29 February would fire once in four years
        shortest = _SHORTEST_MONTH[self.month]
        if self.day > shortest:
            raise ValueError(f"day {self.day} does not exist in month {self.month} every year; use 1-{shortest}")
        return self


class Schedule(_Model):
    cron: str | None = None
    quarterly: Quarterly | None = None
    yearly: Yearly | None = None
    interval: str | None = None
    timezone: str = "Asia/Shanghai"
    start: datetime | None = None
    end: datetime | None = None
    misfire_grace: str = "1h"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("interval", "misfire_grace")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if len(value.split()) != 5:
            raise ValueError(f"expected the five standard cron fields, got {value!r}")
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Schedule:
        given = [k for k in SCHEDULE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of cron, quarterly, yearly or interval")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SCHEDULE_KINDS if getattr(self, k) is not None)

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local_start(self) -> datetime | None:
        """``start`` with the schedule's zone (a time written without one is local)."""
        return _in_zone(self.start, self.zone())

    def local_end(self) -> datetime | None:
        return _in_zone(self.end, self.zone())


def _in_zone(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=zone) if value.tzinfo is None else value


class SendWindow(_Model):
    """Daily hours in which bulk messages may go out (local time of the campaign's time zone).

    China's rules allow bulk SMS only 08:00-21:00; ``end`` before ``start`` means a window across midnight.
    """

    start: str = "08:00"
    end: str = "21:00"

    @field_validator("start", "end")
    @classmethod
    def _time(cls, value: str) -> str:
        return _hhmm(value)

    @model_validator(mode="after")
    def _not_empty(self) -> SendWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would never open")
        return self


class FrequencyCap(_Model):
    """At most ``max`` bulk messages per person within any rolling ``per`` (across all campaigns)."""

    max: int = Field(2, ge=1)
    per: str = "7d"

    @field_validator("per")
    @classmethod
    def _per(cls, value: str) -> str:
        if parse_duration(value).total_seconds() <= 0:
            raise ValueError("the period must be longer than 0")
        return value


class RingbackWindow(_Model):
    """When a ringback campaign's tone plays: numbers are enrolled at ``start`` and restored at ``end``.

    Times without a zone are read as Asia/Shanghai, like ``send_by``.
    """

    start: datetime
    end: datetime

    @field_validator("start", "end")
    @classmethod
    def _zone(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=ZoneInfo("Asia/Shanghai"))

    @model_validator(mode="after")
    def _order(self) -> RingbackWindow:
        if self.end <= self.start:
            raise ValueError("the window must end after it starts")
        return self


def _registered_gateway(value: str, info: ValidationInfo) -> str:
    """A provider name the registry knows. The registry is handed in as validation context
    (``gateways``) by whoever loads the file: the model cannot import the providers; a run's
    stored snapshot is parsed without it, as its names were checked when the run was made."""
    known = (info.context or {}).get("gateways")
    if known is not None and value not in known:
        raise ValueError(f"unknown gateway {value!r} (known: {', '.join(sorted(known))})")
    return value


class Campaign(_Model):
    id: str
    title: str
    owner: str
    #: departments sharing the campaign: together with the owner they must be responsible for its groups
    co_owners: list[str] = Field(default_factory=list)
    #: the plan (themes.yaml) the campaign belongs to: never scheduled, fired or run outside its period
    plan: str | None = None
    #: "sms"; "ringback": numbers are enrolled with a warning tone for ``window`` and restored after;
    #: "voice": one call each, the warning spoken and repeated, press 1 to confirm (small audiences only,
    #: DISPATCH_VOICE_MAX_AUDIENCE)
    channel: Literal["sms", "ringback", "voice"] = "sms"
    template: str | None = None
    #: quarter -> template (every year alike), or "plan": the plan's theme of each quarter of each year
    themes: dict[Literal["Q1", "Q2", "Q3", "Q4"], str] | Literal["plan"] | None = None
    variables: dict[str, str | int | float | bool] = Field(default_factory=dict)
    audience: Audience = Field(default_factory=Audience)
    signature: str = DEFAULT_SIGNATURE
    opt_out_text: str = DEFAULT_OPT_OUT
    send_by: datetime | date | None = None
    schedule: Schedule | None = None
    priority: Literal["bulk", "urgent"] = "bulk"
    reason: str | None = None
    #: daily bulk hours (urgent campaigns ignore it); default 08:00-21:00 local
    send_window: SendWindow = Field(default_factory=SendWindow)
    #: overrides the deployment's default cap (DISPATCH_FREQUENCY_CAP_MAX / _PERIOD) for this campaign
    frequency_cap: FrequencyCap | None = None
    #: ringback campaigns only: when callers hear the tone (enrol at start, restore at end)
    window: RingbackWindow | None = None
    #: the most a run may cost, in CNY (parts x DISPATCH_PART_PRICES); a run estimated above it is refused
    budget: float | None = Field(None, gt=0, description="CNY a run may cost at most, e.g. 5000")
    #: SMS providers to try in order (failover); empty = the deployment's DISPATCH_GATEWAY
    gateways: list[Annotated[str, AfterValidator(_registered_gateway)]] = Field(
        default_factory=list,
        description="SMS providers to try in order when one is down, e.g. [twilio, http]",
    )

    @field_validator("gateways")
    @classmethod
    def _gateways_once(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice: each provider is tried once")
        return value

    @model_validator(mode="after")
    def _ringback_window(self) -> Campaign:
        if self.channel == "ringback" and self.budget is not None:
            raise ValueError("budget is for SMS campaigns: ringback enrolments are not priced")
        if self.channel == "ringback" and self.gateways:
            raise ValueError("gateways is for SMS campaigns; a ringback campaign uses DISPATCH_RINGBACK_GATEWAY")
        if self.channel == "voice" and self.gateways:
            raise ValueError("gateways is for SMS campaigns; a voice campaign uses DISPATCH_VOICE_GATEWAY")
        if self.channel == "ringback" and self.window is None:
            raise ValueError("a ringback campaign needs a window with start and end")
        if self.channel != "ringback" and self.window is not None:
            raise ValueError("window is for ringback campaigns (channel: ringback); SMS hours are send_window")
        return self

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError("use 2-64 lower-case letters, digits, '-' or '_'")
        return value

    @field_validator("signature")
    @classmethod
    def _signature(cls, value: str) -> str:
        if not (value.startswith("【") and value.endswith("】") and len(value) > 2):
            raise ValueError("a signature is written 【name】 and leads every message")
        return value

    @model_validator(mode="after")
    def _template_or_themes(self) -> Campaign:
        if (self.template is None) == (self.themes is None):
            raise ValueError("give either template or themes (quarter -> template), not both or neither")
        if self.priority == "urgent" and not (self.reason or "").strip():
            raise ValueError("an urgent campaign must state a reason")
        if self.themes == "plan" and self.plan is None:
            raise ValueError("themes: plan takes the themes of the campaign's plan: give plan: <id> (themes.yaml)")
        return self

    def template_for(self, when: datetime | None = None) -> str:
        """The template of the quarter ``when`` falls in (Asia/Shanghai), or the single template."""
        if self.template is not None:
            return self.template
        assert self.themes is not None
        if self.themes == "plan":  # the plan's calendar is read with the file (LoadedCampaign.template_for)
            raise CampaignError("the themes are the plan's: read them with the campaign's plan", field="themes")
        when = when or datetime.now(ZoneInfo("Asia/Shanghai"))
        if when.tzinfo is not None:
            # a fire time arrives in UTC: 1 April 00:30 in Shanghai is still 31 March in UTC
            when = when.astimezone(self.zone())
        quarter = quarter_of(when)
        if quarter not in self.themes:
            raise CampaignError(f"no theme for {quarter}", field="themes")
        return self.themes[quarter]

    def zone(self) -> ZoneInfo:
        """The campaign's local time zone: its schedule's, else Asia/Shanghai."""
        return ZoneInfo(self.schedule.timezone if self.schedule else "Asia/Shanghai")

    def template_names(self) -> list[str]:
        if self.template is not None:
            return [self.template]
        assert self.themes is not None
        if self.themes == "plan":
            return []
        return list(dict.fromkeys(self.themes.values()))

    def send_by_datetime(self) -> datetime | None:
        if self.send_by is None:
            return None
        value = self.send_by
        if not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day, 23, 59, 59)
        if value.tzinfo is None:
            value = value.replace(tzinfo=ZoneInfo("Asia/Shanghai"))
        return value

    def owner_department(self) -> domain.Department | None:
        return domain.department(self.owner)

    def owners(self) -> list[domain.Department]:
        """The owner and the co-owners that exist, owner first."""
        found = [domain.department(name) for name in (self.owner, *self.co_owners)]
        return list({d.id: d for d in found if d is not None}.values())


# ------------------------------------------------------------------ run snapshots

#: how many parsed run snapshots a process keeps (a worker sees few runs at a time)
SNAPSHOT_CACHE_SIZE = 256
_snapshots: dict[tuple[str, str], Campaign] = {}
_snapshots_lock = threading.Lock()


def campaign_snapshot(run_id: str, sha256: str, text: str) -> Campaign:
    """The campaign a run was created with, parsed from the YAML text stored on the run.

    A run's snapshot never changes after it is created, so it is parsed once per process and
    kept under (run id, sha256): the worker's batches, the ringback sweeps, the TwiML answers
    and the CLI all read the same object. Callers must not modify it.
    """
    key = (run_id, sha256)
    with _snapshots_lock:
        cached = _snapshots.get(key)
    if cached is not None:
        return cached
    campaign = Campaign.model_validate(yaml.safe_load(text))
    with _snapshots_lock:
        if len(_snapshots) >= SNAPSHOT_CACHE_SIZE:
            _snapshots.clear()
        _snapshots[key] = campaign
    return campaign


# ------------------------------------------------------------------ fire times
# When a schedule fires is part of what a campaign means (validation checks every quarter it fires in
# has a theme), so the trigger arithmetic lives with the schedule model; the scheduler only drives it.

#: interval schedules without a ``start`` are anchored here, so every process computes the same fire times
INTERVAL_ANCHOR = datetime(2000, 1, 1, tzinfo=UTC)
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _crontab_days(field: str) -> str:
    """Standard cron weekdays (0 or 7 = Sunday) as names, since APScheduler 3.x reads 0 as Monday."""
    if not any(ch.isdigit() for ch in field):
        return field
    days: list[str] = []
    for token in field.split(","):
        step = 1
        if "/" in token:
            token, step_text = token.split("/", 1)
            step = int(step_text)
        if token == "*":
            low, high = 0, 6
        elif "-" in token:
            low_text, high_text = token.split("-", 1)
            low, high = int(low_text), int(high_text)
        else:
            low = high = int(token)
        days.extend(_CRON_DAYS[d] for d in range(low, high + 1, step))
    return ",".join(dict.fromkeys(days))


def _local(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=zone) if value.tzinfo is None else value


def within_plan(schedule: Schedule | None, plan: Plan | None) -> Schedule | None:
    """``schedule`` with its start and end narrowed to the plan's period (None: unchanged)."""
    if schedule is None or plan is None:
        return schedule
    zone = schedule.zone()
    start, end = schedule.local_start(), schedule.local_end()
    plan_start, plan_end = plan.start_at(zone), plan.end_at(zone)
    return schedule.model_copy(
        update={
            "start": plan_start if start is None or start < plan_start else start,
            "end": plan_end if end is None or end > plan_end else end,
        }
    )


def make_trigger(schedule: Schedule) -> BaseTrigger:
    """The APScheduler trigger of a validated schedule, in the schedule's time zone."""
    zone = ZoneInfo(schedule.timezone)
    start, end = _local(schedule.start, zone), _local(schedule.end, zone)
    if schedule.cron is not None:
        minute, hour, day, month, weekday = schedule.cron.split()
        return CronTrigger(
            minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_days(weekday),
            timezone=zone, start_date=start, end_date=end,
        )  # fmt: skip
    if schedule.quarterly is not None or schedule.yearly is not None:
        q = schedule.quarterly or schedule.yearly
        assert q is not None
        at_hour, at_minute = (int(x) for x in q.at.split(":"))
        months = ",".join(str(q.month + 3 * i) for i in range(4)) if schedule.quarterly else str(q.month)
        return CronTrigger(
            month=months, day=q.day, hour=at_hour, minute=at_minute, second=0,
            timezone=zone, start_date=start, end_date=end,
        )  # fmt: skip
    assert schedule.interval is not None
    return IntervalTrigger(
        seconds=int(parse_duration(schedule.interval).total_seconds()),
        start_date=start or INTERVAL_ANCHOR.astimezone(zone),
        end_date=end,
        timezone=zone,
    )


def next_after(trigger: BaseTrigger, when: datetime) -> datetime | None:
    """The first fire time strictly after ``when`` (None once the schedule has ended)."""
    value = trigger.get_next_fire_time(None, when + timedelta(microseconds=1))
    return value.astimezone(UTC) if value is not None else None


#: how far an open-ended schedule is followed to learn its quarters: the Gregorian calendar's weekdays
#: repeat every 28 years (1901-2099), so any cron pattern has shown every quarter it fires in by then
QUARTER_HORIZON_YEARS = 28


def first_fire_per_quarter(schedule: Schedule, since: datetime, until: datetime | None) -> dict[str, datetime]:
    """The first fire time (local) in each quarter the schedule fires in between ``since`` and ``until``.

    Jumps to the next quarter after each fire found, so even a 5-second interval costs a few
    trigger look-ups; an open end is followed for ``QUARTER_HORIZON_YEARS``.
    """
    trigger = make_trigger(schedule)
    zone = ZoneInfo(schedule.timezone)
    horizon = until or since + timedelta(days=366 * QUARTER_HORIZON_YEARS)
    found: dict[str, datetime] = {}
    cursor = since - timedelta(microseconds=1)
    for _ in range(4 * QUARTER_HORIZON_YEARS + 4):
        nxt = next_after(trigger, cursor)
        if nxt is None or nxt > horizon:
            break
        local = nxt.astimezone(zone)
        found.setdefault(quarter_of(local), local)
        if len(found) == 4:
            break
        month = (local.month - 1) // 3 * 3 + 4  # first month of the next quarter (13 = next January)
        cursor = datetime(local.year + (month > 12), (month - 1) % 12 + 1, 1, tzinfo=zone) - timedelta(microseconds=1)
    return found


def fire_times(
    schedule: Schedule, since: datetime, until: datetime | None = None, limit: int = 10
) -> Iterator[datetime]:
    """Fire times after ``since`` (and before ``until``), in the schedule's time zone."""
    trigger = make_trigger(schedule)
    zone = ZoneInfo(schedule.timezone)
    current = since - timedelta(microseconds=1)
    for _ in range(limit):
        nxt = next_after(trigger, current)
        if nxt is None or (until is not None and nxt >= until):
            return
        yield nxt.astimezone(zone)
        current = nxt


# --------------------------------------------------------------------------- YAML with positions


@dataclass
class Located:
    """A parsed campaign and where each of its fields sits in the file."""

    path: Path
    text: str
    data: dict[str, Any]
    marks: dict[tuple[Any, ...], tuple[int, int]] = field(default_factory=dict)

    def position(self, loc: Iterable[Any]) -> tuple[int | None, int | None]:
        key = tuple(loc)
        while key:
            if key in self.marks:
                return self.marks[key]
            key = key[:-1]
        return self.marks.get((), (1, 1))

    def error(self, message: str, loc: tuple[Any, ...], cls: type[InputError] = CampaignError) -> InputError:
        line, column = self.position(loc)
        field_name = ".".join(str(p) for p in loc) or None
        return cls(message, path=str(self.path), line=line, column=column, field=field_name)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _walk(node: yaml.Node, path: tuple[Any, ...], marks: dict[tuple[Any, ...], tuple[int, int]]) -> None:
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            _walk(value_node, (*path, key), marks)
            # point a field's errors at its key, which is where an operator looks
            marks[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), marks)


def parse_yaml(path: Path) -> Located:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CampaignError("file not found", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise CampaignError("not UTF-8 text", path=str(path)) from exc
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL in the path
        raise CampaignError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", path=str(path)) from exc
    node, data = safeyaml.load_or_fail(text, str(path), CampaignError)
    if not isinstance(data, dict) or node is None:
        raise CampaignError("a campaign file is a mapping of fields (id, title, owner, ...)", path=str(path), line=1)
    located = Located(path=path, text=text, data=data)
    _walk(node, (), located.marks)
    return located


def _data_path(data: Any, loc: Iterable[Any]) -> tuple[Any, ...]:
    """Keep the parts of a pydantic error location that exist in the YAML (drop union member tags)."""
    path: list[Any] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and part.isidentifier():
            path.append(part)  # a missing or unknown field: still name it
            break
        # anything else is a pydantic union-member tag such as "datetime" or "list[str]": dropped
    return tuple(path)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class an annotation such as ``Quarterly | None`` holds, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _field_help(loc: Iterable[Any]) -> str:
    """What the field an error is about means, from its description (``month: 1-3, the month ...``).

    An error on a field that has a description names it; an error on a model whose fields are
    described (an unknown key in ``quarterly``, a day its month lacks) lists them all, so the
    operator learns the form from the error itself.
    """
    model: type[BaseModel] | None = Campaign
    described: tuple[str, Any] | None = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        info = model.model_fields[part]
        described = (part, info)
        model = _model_in(info.annotation)
    else:
        if model is None and described is not None and described[1].description:
            return f"{described[0]}: {described[1].description}"
    if model is not None and model is not Campaign:
        fields = [f"{name}: {info.description}" for name, info in model.model_fields.items() if info.description]
        if fields:
            name = described[0] if described else model.__name__.lower()
            return f"{name} takes " + "; ".join(fields)
    return ""


def _schema(located: Located, gateways: Collection[str] | None = None) -> Campaign:
    found = first_bad_text(located.data, allow=LINE_BREAKS)
    if found:
        loc, reason = found
        raise located.error(reason, loc)
    try:
        return Campaign.model_validate(located.data, context={"gateways": gateways})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _data_path(located.data, first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        elif first["type"] == "missing":
            message = "required field is missing"
        message = message.removeprefix("Value error, ")
        described = _field_help(first["loc"])
        if described:
            message += f" — {described}"
        raise located.error(message, loc) from exc


@dataclass(frozen=True)
class LoadedCampaign:
    campaign: Campaign
    located: Located
    templates: dict[str, TemplateSource]
    #: the plan (themes.yaml) the campaign belongs to, if it names one
    plan: Plan | None = None

    @property
    def path(self) -> Path:
        return self.located.path

    @property
    def schedule(self) -> Schedule | None:
        """The schedule as it fires: within the plan's period when the campaign belongs to a plan."""
        return within_plan(self.campaign.schedule, self.plan)

    def template_names(self) -> list[str]:
        if self.campaign.themes == "plan" and self.plan is not None:
            return list(dict.fromkeys(t.template for t in self.plan.themes.values()))
        return self.campaign.template_names()

    def theme_title(self, when: datetime) -> str | None:
        """The plan's theme of the quarter ``when`` falls in (campaigns with ``themes: plan``)."""
        if self.campaign.themes != "plan" or self.plan is None:
            return None
        theme = self.plan.theme_at(when.astimezone(self.campaign.zone()))
        return theme.title if theme else None

    def template_for(self, when: datetime | None = None) -> str:
        """The template as of ``when``; a quarter without a theme is reported at ``themes`` in the file."""
        if self.campaign.themes == "plan" and self.plan is not None:
            local = (when or datetime.now(UTC)).astimezone(self.campaign.zone())
            theme = self.plan.theme_at(local)
            if theme is None:
                raise self.located.error(
                    f"{local:%Y-%m-%d} is outside plan {self.plan.id} ({self.plan.period()}), which has the themes: "
                    f"give --as-of a date within the plan",
                    ("plan",),
                )
            return theme.template
        try:
            return self.campaign.template_for(when)
        except CampaignError as exc:
            local = (when or datetime.now(UTC)).astimezone(self.campaign.zone())
            covered = ", ".join(sorted(self.campaign.themes or {}))
            raise self.located.error(
                f"{exc.message} (the run is as of {local:%Y-%m-%d}); the themes cover {covered}: "
                f"give --as-of a date in one of those quarters",
                ("themes",),
            ) from exc

    def composer(self, when: datetime | None = None) -> Composer:
        return self.composer_for(self.template_for(when))

    def template_now_or_next(self, now: datetime) -> str:
        """The template a run would use now, or, in a quarter without a theme, the one of the next fire.

        A yearly campaign themed only for its own quarter is still previewed the rest of the year.
        """
        c = self.campaign
        schedule = self.schedule
        if c.themes == "plan" and self.plan is not None:
            local = now.astimezone(c.zone())
            if self.plan.contains(local.date()):
                return self.template_for(now)
            # outside the plan: the theme of its next fire, else (the plan is over) of its last quarter
            upcoming = next(fire_times(schedule, now, limit=1), None) if schedule else None
            if upcoming is not None:
                return self.template_for(upcoming)
            return self.template_for(
                self.plan.end_at(c.zone()) if local.date() > self.plan.end else self.plan.start_at(c.zone())
            )
        if c.themes is None or schedule is None or quarter_of(now.astimezone(c.zone())) in c.themes:
            return self.template_for(now)
        upcoming = next(fire_times(schedule, now, limit=1), None)
        return self.template_for(upcoming) if upcoming is not None else c.template_names()[0]

    def composer_for(self, template_name: str) -> Composer:
        c = self.campaign
        owner = c.owner_department()
        return Composer(
            source=self.templates[template_name],
            signature=c.signature,
            opt_out_text=c.opt_out_text,
            variables=c.variables,
            campaign={"id": c.id, "title": c.title, "owner": owner.name if owner else c.owner},
        )


@dataclass(frozen=True)
class AsOf:
    """The date a manual run is made as of (``dispatch run --as-of``), in the campaign's time zone.

    A date alone (``2021-08-01``) means that whole day: it is the start of the day for choosing
    the theme, and compared by date with the schedule's start and end.
    """

    when: datetime
    date_only: bool

    def __str__(self) -> str:
        return f"{self.when:%Y-%m-%d}" if self.date_only else _minute(self.when)

    def before(self, moment: datetime) -> bool:
        if self.date_only:
            return self.when.date() < moment.astimezone(self.when.tzinfo).date()
        return self.when < moment

    def after(self, moment: datetime) -> bool:
        if self.date_only:
            return self.when.date() > moment.astimezone(self.when.tzinfo).date()
        return self.when > moment


def parse_as_of(text: str, zone: ZoneInfo) -> AsOf:
    """``2021-08-01`` or ``2021-08-01T10:00`` (local to ``zone`` unless it carries an offset)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise UsageError(
            f"expected an ISO date or date-time such as 2021-08-01 or 2021-08-01T10:00, got {text!r}", field="as-of"
        ) from exc
    date_only = "T" not in text and " " not in text.strip()
    return AsOf(value.replace(tzinfo=zone) if value.tzinfo is None else value.astimezone(zone), date_only)


def check_run_date(loaded: LoadedCampaign, now: datetime, as_of: AsOf | None = None) -> None:
    """Refuse a manual run that the schedule's start and end rule out, or that has no theme for its date.

    Without ``--as-of`` a campaign whose schedule has ended is not run any more; with it, the
    as-of date must lie within the schedule (making up a fire that was missed, also after the end).
    """
    plan = loaded.plan
    if plan is not None:
        zone = loaded.campaign.zone()
        day = (as_of.when if as_of is not None else now).astimezone(zone).date()
        if not plan.contains(day):
            said = f"--as-of {as_of}" if as_of is not None else f"today ({day:%Y-%m-%d})"
            hint = "" if as_of is not None else "; to run it as of a date in the plan, give --as-of"
            raise loaded.located.error(
                f"{said} is outside plan {plan.id} ({plan.period()}), to which the campaign belongs{hint}",
                ("plan",),
            )
    schedule = loaded.campaign.schedule
    start, end = (schedule.local_start(), schedule.local_end()) if schedule else (None, None)
    if as_of is not None:
        if start is not None and as_of.before(start):
            raise loaded.located.error(
                f"--as-of {as_of} is before the schedule starts ({_minute(start)})", ("schedule", "start")
            )
        if end is not None and as_of.after(end):
            raise loaded.located.error(
                f"--as-of {as_of} is after the schedule ends ({_minute(end)})", ("schedule", "end")
            )
    elif end is not None and now > end:
        raise loaded.located.error(
            f"the schedule ended on {_minute(end)}, so the campaign is not run any more "
            f"(to make up a missed fire, give --as-of a date within the schedule)",
            ("schedule", "end"),
        )
    loaded.template_for(as_of.when if as_of else now)  # a quarter without a theme: refused before anything


def _world_errors(located: Located, campaign: Campaign, templates_dir: Path) -> Iterator[InputError]:
    if campaign.owner_department() is None:
        yield located.error(f"unknown department {campaign.owner!r} (known: {domain.department_names()})", ("owner",))
    for index, name in enumerate(campaign.co_owners):
        if domain.department(name) is None:
            yield located.error(
                f"unknown department {name!r} (known: {domain.department_names()})", ("co_owners", index)
            )
    audience = campaign.audience
    if audience.districts != "all":
        for index, name in enumerate(audience.districts):
            if domain.district(name) is None:
                yield located.error(
                    f"unknown district {name!r} (known: all, or {domain.district_names()})",
                    ("audience", "districts", index),
                )
    for key in ("segments", "exclude_segments"):
        for index, name in enumerate(getattr(audience, key)):
            if domain.segment(name) is None:
                yield located.error(
                    f"unknown segment {name!r} (known: {domain.segment_names()})", ("audience", key, index)
                )
    chosen = set(audience.district_ids())
    for index, grid in enumerate(audience.grids):
        owner = domain.district_of_grid(grid)
        if owner is None:
            yield located.error(f"grid {grid!r} belongs to no known district", ("audience", "grids", index))
        elif owner.id not in chosen:
            selected = ", ".join(d.name for d in domain.DISTRICTS if d.id in chosen)
            yield located.error(
                f"grid {grid!r} is in {owner.name}, which the audience does not include "
                f"(districts: {selected}); a grid only narrows a district that is selected",
                ("audience", "grids", index),
            )
    yield from _ownership_errors(located, campaign)


def _ownership_errors(located: Located, campaign: Campaign) -> Iterator[InputError]:
    """The owner and co-owners must be responsible for what the campaign targets (三, 五(三)).

    A department warns the groups it owns in organisation.yaml; a town/street warns anyone, but only
    in its own district (属地管理). A campaign for several departments' groups, or several towns'
    districts, lists the others as ``co_owners``. No groups means everyone: any department may.
    """
    owner = campaign.owner_department()
    if owner is None or any(domain.department(n) is None for n in campaign.co_owners):
        return  # reported above
    owners = campaign.owners()
    names = "、".join(d.name for d in owners)
    audience = campaign.audience
    for index, name in enumerate(audience.segments):
        seg = domain.segment(name)
        if seg is None or any(domain.responsible_for(d.id, seg.id) for d in owners):
            continue
        responsible = domain.department(seg.owner)
        who = responsible.name if responsible else seg.owner
        yield located.error(
            f"{seg.id} ({seg.name}) is {who}'s group ({seg.section or 'organisation.yaml'}), not {names}'s: "
            f"add {who} to co_owners, or leave the group to its campaigns",
            ("audience", "segments", index),
        )
    if owner.kind != "town":
        return
    towns = {d.district for d in owners if d.kind == "town"}
    own = "、".join(d.name for d in owners if d.kind == "town")
    if audience.districts == "all":
        outside = [d for d in domain.DISTRICTS if d.id not in towns]
        if outside:
            yield located.error(
                f"{own} may target only its own district, not all ({', '.join(d.name for d in outside)} "
                f"are not its): list its district, or add those towns/streets to co_owners",
                ("audience", "districts"),
            )
        return
    for index, name in enumerate(audience.districts):
        dist = domain.district(name)
        if dist is not None and dist.id not in towns:
            yield located.error(
                f"{dist.name} is not {own}'s district: a town/street targets only its own, "
                f"unless {dist.name} is among the co_owners",
                ("audience", "districts", index),
            )


def _plan_errors(located: Located, campaign: Campaign, plan: Plan | None) -> Iterator[InputError]:
    """A schedule or ringback window reaching outside the period of the plan the campaign belongs to."""
    if plan is None:
        return
    schedule = campaign.schedule
    if schedule is not None:
        zone = schedule.zone()
        start, end = schedule.local_start(), schedule.local_end()
        if start is not None and start < plan.start_at(zone):
            yield located.error(
                f"the schedule starts ({_minute(start)}) before plan {plan.id} does ({plan.period()})",
                ("schedule", "start"),
            )
        if end is not None and end > plan.end_at(zone):
            yield located.error(
                f"the schedule ends ({_minute(end)}) after plan {plan.id} does ({plan.period()})", ("schedule", "end")
            )
        if start is not None and start > plan.end_at(zone):
            yield located.error(
                f"the schedule starts ({_minute(start)}) after plan {plan.id} has ended ({plan.period()})",
                ("schedule", "start"),
            )
    window = campaign.window
    if window is not None:
        zone = campaign.zone()
        if window.start < plan.start_at(zone) or window.end > plan.end_at(zone):
            yield located.error(
                f"the ringback window ({_minute(window.start)} to {_minute(window.end)}) is not within "
                f"plan {plan.id} ({plan.period()})",
                ("window",),
            )


def _schedule_errors(
    located: Located, campaign: Campaign, now: datetime, plan: Plan | None = None
) -> Iterator[InputError]:
    """A schedule that ends before it starts or never fires; themes missing a quarter it fires in."""
    schedule = within_plan(campaign.schedule, plan)
    fires: dict[str, datetime] | None = None
    if schedule is not None:
        start, end = schedule.local_start(), schedule.local_end()
        if start is not None and end is not None:
            if end <= start:
                yield located.error(
                    f"the schedule ends ({_minute(end)}) before it starts ({_minute(start)})", ("schedule", "end")
                )
                return
            fires = first_fire_per_quarter(schedule, start, end)
            if not fires:
                within = f" (within plan {plan.id})" if plan is not None else ""
                yield located.error(
                    f"the schedule never fires between its start ({_minute(start)}) and end ({_minute(end)}){within}",
                    ("schedule",),
                )
                return
        elif campaign.themes is not None:
            # no start: what matters is what it can still fire (a catch-up within misfire_grace included)
            since = start or now - parse_duration(schedule.misfire_grace)
            fires = first_fire_per_quarter(schedule, since, end)
    if campaign.themes is None or campaign.themes == "plan":
        return  # a plan has a theme for every quarter of its period (checked with themes.yaml)
    if schedule is None:
        missing = [q for q in QUARTERS if q not in campaign.themes]
        if missing:
            yield located.error(
                f"no theme for {', '.join(missing)}: a campaign without a schedule can be run on any date, "
                f"so its themes need Q1, Q2, Q3 and Q4 (or give one template)",
                ("themes",),
            )
        return
    assert fires is not None
    unthemed = sorted((when, q) for q, when in fires.items() if q not in campaign.themes)
    if unthemed:
        (first_when, first_q), *others = unthemed
        also = "".join(f"; none for {q} either (fires {_minute(when)})" for when, q in others)
        yield located.error(
            f"no theme for {first_q}, but the schedule fires on {_minute(first_when)}{also}", ("themes",)
        )


def _minute(when: datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M}"


def _template_errors(
    located: Located, campaign: Campaign, templates_dir: Path, plan: Plan | None = None
) -> Iterator[InputError | TemplateSource]:
    names: list[tuple[str, tuple[Any, ...]]]
    if campaign.template is not None:
        names = [(campaign.template, ("template",))]
    elif campaign.themes == "plan":
        names = [(t.template, ("themes",)) for t in plan.themes.values()] if plan is not None else []
    else:
        assert campaign.themes is not None
        names = [(name, ("themes", quarter)) for quarter, name in campaign.themes.items()]
    seen: set[str] = set()
    for name, loc in names:
        if name in seen:
            continue
        seen.add(name)
        try:
            source = load(templates_dir, name)
            needed = undeclared(source)
        except TemplateError as exc:
            if exc.path and exc.line:  # syntax error inside the template: point into the template
                yield TemplateError(exc.message, path=str(templates_dir / name), line=exc.line, field="template")
            else:
                yield located.error(exc.message, loc, TemplateError)
            continue
        missing = sorted(needed - BUILTIN_NAMES - set(campaign.variables))
        if missing:
            yield located.error(
                f"template {name} needs {', '.join(missing)}, which the campaign does not give",
                ("variables",) if "variables" in located.data else loc,
                TemplateError,
            )
            continue
        lc = LoadedCampaign(campaign, located, {name: source}, plan)
        try:
            text = lc.composer_for(name).compose(SAMPLE_RECIPIENT)
        except TemplateError as exc:
            if exc.line:  # a bound the template broke at a line of its own: point into the template
                yield TemplateError(exc.message, path=str(templates_dir / name), line=exc.line, field="template")
            else:
                yield located.error(f"template {name}: {exc.message}", loc, TemplateError)
            continue
        if len(text) > MAX_MESSAGE_CHARS:
            yield located.error(
                f"template {name} renders to {len(text)} characters with signature and opt-out; "
                f"the limit is {MAX_MESSAGE_CHARS}",
                loc,
                TemplateError,
            )
            continue
        yield source


#: the plans a campaign may name, by id (``themes.load``); None: read themes.yaml beside templates/ when needed
Plans = Mapping[str, Plan] | None


def _plan_of(located: Located, campaign: Campaign, templates_dir: Path, plans: Plans) -> Plan:
    """The plan a campaign names; themes.yaml is read here only when the caller passed none."""
    assert campaign.plan is not None
    path = templates_dir.parent / themes.FILE_NAME
    known = plans if plans is not None else themes.load_optional(path)
    plan = known.get(campaign.plan)
    if plan is None:
        raise located.error(themes.unknown_plan(campaign.plan, dict(known), path), ("plan",))
    return plan


def check_file(
    path: Path,
    templates_dir: Path,
    now: datetime | None = None,
    *,
    gateways: Collection[str] | None = None,
    plans: Plans = None,
) -> tuple[LoadedCampaign | None, list[InputError]]:
    """Every problem with one campaign file (empty list = valid); ``now`` is the business clock's time.

    ``gateways``: the registered SMS provider names a ``gateways:`` list may use (None: not checked).
    ``plans``: the plans of themes.yaml (None: read from beside ``templates_dir`` if the campaign names one).
    """
    try:
        located = parse_yaml(path)
        campaign = _schema(located, gateways)
        plan = _plan_of(located, campaign, templates_dir, plans) if campaign.plan is not None else None
    except InputError as exc:
        return None, [exc]
    errors: list[InputError] = list(_world_errors(located, campaign, templates_dir))
    outside = list(_plan_errors(located, campaign, plan))
    errors.extend(outside)
    if not outside:  # a schedule reaching outside its plan: that is the one thing to fix first
        errors.extend(_schedule_errors(located, campaign, now or datetime.now(UTC), plan))
    templates: dict[str, TemplateSource] = {}
    for item in _template_errors(located, campaign, templates_dir, plan):
        if isinstance(item, TemplateSource):
            templates[item.name] = item
        else:
            errors.append(item)
    if errors:
        return None, errors
    return LoadedCampaign(campaign, located, templates, plan), []


def load_campaign(
    path: Path,
    templates_dir: Path,
    now: datetime | None = None,
    *,
    gateways: Collection[str] | None = None,
    plans: Plans = None,
) -> LoadedCampaign:
    """The campaign at ``path``, fully checked; raises the first ``InputError`` found."""
    loaded, errors = check_file(path, templates_dir, now, gateways=gateways, plans=plans)
    if errors:
        raise errors[0]
    assert loaded is not None
    return loaded


def campaign_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        try:
            is_dir = path.is_dir()
        except (OSError, ValueError):  # a name too long to look up: reading it reports the problem
            is_dir = False
        if is_dir:
            yield from sorted(p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"})
        else:
            yield path


def check_paths(
    paths: Iterable[Path],
    templates_dir: Path,
    now: datetime | None = None,
    *,
    gateways: Collection[str] | None = None,
    plans: Plans = None,
) -> tuple[list[LoadedCampaign], list[InputError]]:
    loaded: list[LoadedCampaign] = []
    errors: list[InputError] = []
    ids: dict[str, Path] = {}
    for path in campaign_files(paths):
        campaign, file_errors = check_file(path, templates_dir, now, gateways=gateways, plans=plans)
        errors.extend(file_errors)
        if campaign is not None:
            other = ids.get(campaign.campaign.id)
            if other is not None:
                errors.append(campaign.located.error(f"id {campaign.campaign.id!r} is also used by {other}", ("id",)))
                continue
            ids[campaign.campaign.id] = path
            loaded.append(campaign)
    return loaded, errors


def upcoming_fires(
    loaded: Iterable[LoadedCampaign], start: datetime, end: datetime | None, count: int
) -> list[dict[str, Any]]:
    """Every scheduled campaign's next ``count`` fire times from ``start``, with the template (and the plan's
    theme) of each fire; a campaign of a plan fires only within the plan's period."""
    items: list[dict[str, Any]] = []
    for lc in loaded:
        schedule = lc.schedule
        if schedule is None:
            continue
        fires = [
            {"fire_time": ft.isoformat(), "template": lc.template_for(ft), "theme": lc.theme_title(ft)}
            for ft in fire_times(schedule, start, end, count)
        ]
        plan = lc.plan
        items.append({
            "campaign_id": lc.campaign.id, "path": str(lc.path), "kind": schedule.kind, "timezone": schedule.timezone,
            "misfire_grace": schedule.misfire_grace, "priority": lc.campaign.priority, "fires": fires,
            "plan": None if plan is None else {"id": plan.id, "start": str(plan.start), "end": str(plan.end)},
        })  # fmt: skip
    return items
