"""The assessment's targets (考核指标): what each department and town must reach, per year and quarter.

``targets.yaml`` at the project root (``DISPATCH_TARGETS_PATH``) gives, per year, a ``default``
and per quarter (``Q1``..``Q4``) entries by department or town (id or Chinese name)::

    2021:
      default: {coverage: 0.9, pushes: 1}       # every town and every department owning a group
      Q3:
        social_affairs: {coverage: 0.95, pushes: 2}

``coverage`` is the share (0-1) of the residents it answers for that must be reached in the
quarter; ``pushes`` how many runs must have reached them. Who answers for whom: a department
for the population groups it owns (``domain.SEGMENTS``' owner), a town or street for the
residents of its district. A department that owns no group in organisation.yaml (法院, 检察院,
政法和应急管理局, 财政局) has no one of its own to cover and is not scored; naming it is an error.

Errors are one line, ``targets.yaml:LINE: field: message`` (exit 2), like campaign files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import domain, safeyaml
from .errors import TargetsError

QUARTERS = ("Q1", "Q2", "Q3", "Q4")


@dataclass(frozen=True)
class Unit:
    """Someone the assessment scores: a department (its groups) or a town (its district)."""

    id: str
    name: str
    kind: Literal["department", "town"]
    #: the groups a department answers for (empty for a town)
    segments: tuple[str, ...] = ()


def units() -> list[Unit]:
    """Every town, then every department that owns at least one population group, in domain order.

    A town's id is its district's id; should the departments list carry the towns as well, they
    are not counted twice.
    """
    towns = [Unit(d.id, d.name, "town") for d in domain.DISTRICTS]
    town_ids = {d.id for d in domain.DISTRICTS}
    departments = []
    for dep in domain.DEPARTMENTS:
        if dep.id in town_ids:
            continue
        owned = tuple(s.id for s in domain.SEGMENTS if s.owner == dep.id)
        if owned:
            departments.append(Unit(dep.id, dep.name, "department", owned))
    return departments + towns


def unit_id(name: str) -> str | None:
    """The id of a town or department named by id or Chinese name."""
    found = domain.district(name) or domain.department(name)
    return found.id if found else None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Model):
    coverage: float = Field(ge=0, le=1, description="0-1, the share of its residents reached in the quarter")
    pushes: int = Field(ge=0, le=1000, description="runs that must have reached them in the quarter")

    @field_validator("coverage", mode="before")
    @classmethod
    def _share(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a share between 0 and 1 such as 0.9, got {value!r}")
        return value


class YearTargets(_Model):
    default: Target | None = None
    Q1: dict[str, Target] = Field(default_factory=dict)
    Q2: dict[str, Target] = Field(default_factory=dict)
    Q3: dict[str, Target] = Field(default_factory=dict)
    Q4: dict[str, Target] = Field(default_factory=dict)


@dataclass(frozen=True)
class Targets:
    path: Path
    years: dict[int, YearTargets]

    def year_in_force(self, year: int) -> int | None:
        """The year whose targets apply: ``year`` itself, else the latest earlier year (targets stand
        until replaced, so the plan's last year keeps being assessed after 2023); None before the first."""
        return max((y for y in self.years if y <= year), default=None)

    def target(self, year: int, quarter: str, unit: str) -> Target | None:
        """The quarter's own entry for the unit, else the year's default, else none (not scored)."""
        in_force = self.year_in_force(year)
        if in_force is None:
            return None
        entry = self.years[in_force]
        named = {unit_id(k): v for k, v in getattr(entry, quarter).items()}
        return named.get(unit, entry.default)


def _marks(node: yaml.Node, path: tuple[Any, ...], marks: dict[tuple[Any, ...], int]) -> None:
    marks[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = yaml.safe_load(key_node.value) if key_node.tag.endswith(":int") else key_node.value
            _marks(value_node, (*path, key), marks)
            marks[(*path, key)] = key_node.start_mark.line + 1


def load(path: Path) -> Targets:
    """``targets.yaml`` checked in full: YAML, schema, known departments and towns; raises ``TargetsError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TargetsError("file not found (the assessment needs its targets)", path=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetsError(f"cannot read: {exc}", path=str(path)) from exc
    node, data = safeyaml.load_or_fail(text, str(path), TargetsError)
    marks: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _marks(node, (), marks)

    def error(message: str, loc: tuple[Any, ...]) -> TargetsError:
        key = loc
        while key and key not in marks:
            key = key[:-1]
        return TargetsError(message, path=str(path), line=marks.get(key, 1), field=".".join(map(str, loc)) or None)

    if not isinstance(data, dict) or not data:
        raise error("expected years (2021:) each with a default and/or quarters Q1-Q4", ())
    years: dict[int, YearTargets] = {}
    for year, entry in data.items():
        if isinstance(year, bool) or not isinstance(year, int) or not 2000 <= year <= 2100:
            raise error(f"expected a year such as 2021, got {year!r}", (year,))
        try:
            years[year] = YearTargets.model_validate(entry if entry is not None else {})
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = (year, *(p for p in first["loc"] if not str(p).startswith(("function-", "float", "int"))))
            message = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                message = "unknown field (expected default, Q1, Q2, Q3, Q4; coverage, pushes)"
            elif first["type"] == "missing":
                message = "required field is missing (a target gives coverage and pushes)"
            raise error(message, loc) from exc
        scored = {u.id for u in units()}
        for quarter in QUARTERS:
            seen: dict[str, str] = {}
            for key in getattr(years[year], quarter):
                found = unit_id(str(key))
                if found is None:
                    raise error(
                        f"unknown department or town {key!r} (known: {', '.join(u.id for u in units())})",
                        (year, quarter, key),
                    )
                if found not in scored:
                    raise error(
                        f"{key} owns no population group: it has no residents of its own to cover", (year, quarter, key)
                    )
                if found in seen:
                    raise error(f"{key} is also given as {seen[found]}", (year, quarter, key))
                seen[found] = str(key)
    return Targets(path, years)
