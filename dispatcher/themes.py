"""``themes.yaml``: the plan periods and the police sub-bureau's theme of each quarter.

The plan runs 2021-2023 and asks the police sub-bureau to set a publicity theme per
quarter (以季度为单位明确宣传主题和工作重点, 五(三)). A campaign that belongs to a plan
says so (``plan: <id>``): it cannot be scheduled outside the plan's period, the scheduler
never fires it outside, and a manual run outside is refused unless ``--as-of`` names a
date inside. With ``themes: plan`` its text is the plan's theme of the quarter *of that
year*: every quarter of the period has its own template, and one template serving two
quarters is refused unless the later one says ``repeat: true`` — so 2022 does not send
2021's text by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from .organisation import read_config

FILE_NAME = "themes.yaml"
_QUARTER_RE = re.compile(r"^(\d{4})-Q([1-4])$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThemeSpec(_Model):
    title: str = Field(min_length=1, description="the quarter's theme, e.g. 刷单返利诈骗")
    template: str = Field(min_length=1, description="template path under templates/")
    #: the same template as an earlier quarter, on purpose
    repeat: bool = False


class PlanSpec(_Model):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,63}$")
    title: str = Field(min_length=1)
    start: date
    end: date
    themes: dict[str, ThemeSpec] = Field(default_factory=dict, description="YYYY-Qn -> theme and template")


class ThemesSpec(_Model):
    plans: list[PlanSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Theme:
    quarter: str
    title: str
    template: str


@dataclass(frozen=True)
class Plan:
    id: str
    title: str
    #: first and last day, inclusive, in the campaign's local time
    start: date
    end: date
    themes: dict[str, Theme]
    path: str

    def period(self) -> str:
        return f"{self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}"

    def start_at(self, zone: ZoneInfo) -> datetime:
        return datetime.combine(self.start, time(0, 0), tzinfo=zone)

    def end_at(self, zone: ZoneInfo) -> datetime:
        """The last instant of the period (its last day, 23:59:59.999999 local)."""
        return datetime.combine(self.end, time.max, tzinfo=zone)

    def contains(self, day: date) -> bool:
        return self.start <= day <= self.end

    def theme_at(self, local: datetime) -> Theme | None:
        """The theme of the quarter ``local`` (already in the campaign's zone) falls in."""
        return self.themes.get(quarter_key(local))


def quarter_key(local: datetime | date) -> str:
    return f"{local.year}-Q{(local.month - 1) // 3 + 1}"


def _quarters(start: date, end: date) -> list[str]:
    keys: list[str] = []
    year, q = start.year, (start.month - 1) // 3 + 1
    while (year, q) <= (end.year, (end.month - 1) // 3 + 1):
        keys.append(f"{year}-Q{q}")
        year, q = (year + 1, 1) if q == 4 else (year, q + 1)
    return keys


def load(path: Path) -> dict[str, Plan]:
    """The plans in ``path`` by id, fully checked; the first problem as one ``OrganisationError`` line (exit 2)."""
    spec, config = read_config(path, ThemesSpec, "themes.yaml")
    plans: dict[str, Plan] = {}
    for i, p in enumerate(spec.plans):
        loc = ("plans", i)
        if p.id in plans:
            raise config.error(f"plan {p.id!r} is listed twice", (*loc, "id"))
        if p.end < p.start:
            raise config.error(f"the plan ends ({p.end}) before it starts ({p.start})", (*loc, "end"))
        wanted = _quarters(p.start, p.end)
        used: dict[str, str] = {}
        themes: dict[str, Theme] = {}
        for key, theme in p.themes.items():
            if not _QUARTER_RE.match(key):
                raise config.error(f"expected a quarter such as 2021-Q1, got {key!r}", (*loc, "themes", key))
            if key not in wanted:
                raise config.error(f"{key} is outside the plan's period ({p.start} to {p.end})", (*loc, "themes", key))
            earlier = used.get(theme.template)
            if earlier is not None and not theme.repeat:
                raise config.error(
                    f"{theme.template} is already the theme of {earlier}: write a new template for {key} "
                    f"(or say repeat: true if the same text is meant)",
                    (*loc, "themes", key, "template"),
                )
            used.setdefault(theme.template, key)
            themes[key] = Theme(key, theme.title, theme.template)
        missing = [key for key in wanted if key not in themes]
        if missing:
            message = f"no theme for {', '.join(missing)}: every quarter of the plan has one"
            raise config.error(message, (*loc, "themes"))
        plans[p.id] = Plan(p.id, p.title, p.start, p.end, themes, str(path))
    return plans


def load_optional(path: Path) -> dict[str, Plan]:
    """``load``, or no plans at all when the project has no themes.yaml."""
    if not path.is_file():
        return {}
    return load(path)


def unknown_plan(name: str, plans: dict[str, Plan], path: Path | None) -> str:
    if not plans:
        return f"unknown plan {name!r}: there is no {path or FILE_NAME} declaring plans"
    return f"unknown plan {name!r} (known: {', '.join(sorted(plans))})"
