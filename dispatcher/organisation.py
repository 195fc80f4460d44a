"""``organisation.yaml``: who does what in the programme, as data rather than code.

The 2021-2023 plan (``shared/seed``, sections 三 and 五) names the departments, what each
is responsible for, the six towns/streets and their grids (网格 + 警格). Operators
change that as the zone reorganises (a department renamed, a grid split), so it lives in
a file at the project root; a copy of the plan's version ships inside the package
(``dispatcher/defaults/organisation.yaml``) for a bare install.

The file is read with the project's safe YAML loader and validated with pydantic; every
problem is one line ``file:line:column: field: message`` (exit 2). What it yields are the
plain, frozen records ``domain`` exposes (``District``, ``Department``, ``Segment``...).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import safeyaml
from .errors import InputError, OrganisationError

#: the organisation the package ships (the plan's), used when a project has no organisation.yaml
DEFAULT_PATH = Path(__file__).with_name("defaults") / "organisation.yaml"
FILE_NAME = "organisation.yaml"
#: the pseudo life stage of groups drawn for every synthetic resident whatever their stage
EVERYONE = "everyone"
_ID_RE = re.compile(r"^[a-z][a-z0-9_]{1,47}$")
_GRID_RE = re.compile(r"^[A-Z]{1,6}-[A-Z0-9]{1,8}$")


# ------------------------------------------------------------------ the records everything else reads


@dataclass(frozen=True)
class Grid:
    """A community grid (网格) and the police grid (警格) and station that cover it."""

    id: str
    district: str
    police_grid: str
    police_station: str


@dataclass(frozen=True)
class PoliceGrid:
    """A police grid (警格): the community police officer's patch, several 网格 of one district."""

    id: str
    name: str
    district: str
    police_station: str
    grids: tuple[str, ...]


@dataclass(frozen=True)
class District:
    id: str
    name: str
    #: prefix of this district's grid codes, e.g. HL-07
    grid_prefix: str
    #: rough share of the zone's population, used by the synthetic registry
    weight: float
    #: its grids, in the order the synthetic registry draws them
    grids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Department:
    id: str
    name: str
    #: "department" (区级机关) or "town" (镇/街道, whose id is its district's)
    kind: str = "department"
    #: a town's own district (None for a department)
    district: str | None = None
    #: the section of the plan that gives it its task, e.g. 三(九)
    section: str | None = None
    duty: str | None = None


@dataclass(frozen=True)
class Segment:
    id: str
    name: str
    #: the department responsible for warning this group (and assessed on it)
    owner: str
    #: share of residents in this group, used by the synthetic registry
    share: float
    section: str | None = None
    #: life stage -> chance a synthetic resident of that stage is in the group ("everyone": any stage)
    registry: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Stage:
    """A life stage of the synthetic registry: each resident is drawn into exactly one."""

    id: str
    share: float


@dataclass(frozen=True)
class Organisation:
    path: str
    districts: tuple[District, ...]
    departments: tuple[Department, ...]
    segments: tuple[Segment, ...]
    police_grids: tuple[PoliceGrid, ...]
    grids: tuple[Grid, ...]
    stages: tuple[Stage, ...]
    #: the department that puts the action into the annual assessment (考核), 三(四)
    assessed_by: str
    _lookup: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for kind, items in (
            ("district", self.districts),
            ("department", self.departments),
            ("segment", self.segments),
            ("police_grid", self.police_grids),
        ):
            self._lookup[kind] = {key: item for item in items for key in (item.id, item.name)}
        self._lookup["grid"] = {g.id: g for g in self.grids}
        self._lookup["prefix"] = {d.grid_prefix: d for d in self.districts}

    def find(self, kind: str, name: str) -> Any:
        return self._lookup[kind].get(name.strip())

    def grid(self, code: str) -> Grid | None:
        return self._lookup["grid"].get(code.strip().upper())

    def district_of_prefix(self, prefix: str) -> District | None:
        return self._lookup["prefix"].get(prefix.upper())


# ------------------------------------------------------------------ the file's schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupSpec(_Model):
    id: str = Field(pattern=_ID_RE.pattern, description="lower-case id used in campaigns and the registry")
    name: str = Field(min_length=1, description="the Chinese name, e.g. 退休人员")
    section: str | None = None
    registry: dict[str, float] = Field(
        default_factory=dict, description="life stage (or everyone) -> chance 0-1 of a synthetic resident"
    )


class DepartmentSpec(_Model):
    id: str = Field(pattern=_ID_RE.pattern)
    name: str = Field(min_length=1)
    kind: Literal["department", "town"] = "department"
    section: str | None = None
    duty: str | None = None
    groups: list[GroupSpec] = Field(default_factory=list)


class PoliceGridSpec(_Model):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    grids: list[str] = Field(min_length=1, description="the 网格 codes this 警格 covers, e.g. HL-01")


class StationSpec(_Model):
    name: str = Field(min_length=1, description="the police station (派出所)")
    police_grids: list[PoliceGridSpec] = Field(min_length=1)


class DistrictSpec(_Model):
    id: str = Field(pattern=_ID_RE.pattern)
    name: str = Field(min_length=1)
    grid_prefix: str = Field(pattern=r"^[A-Z]{1,6}$")
    weight: float = Field(gt=0, description="share of the zone's population (synthetic registry)")
    police_stations: list[StationSpec] = Field(min_length=1)


class StageSpec(_Model):
    id: str = Field(pattern=_ID_RE.pattern)
    share: float = Field(gt=0, le=1)


class OrganisationSpec(_Model):
    assessed_by: str
    registry_stages: list[StageSpec] = Field(min_length=1)
    departments: list[DepartmentSpec] = Field(min_length=1)
    districts: list[DistrictSpec] = Field(min_length=1)


# ------------------------------------------------------------------ reading a config file with positions

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ConfigFile:
    """A validated config file and where each of its fields is, for errors found after the schema."""

    path: str
    marks: dict[tuple[Any, ...], tuple[int, int]]

    def error(self, message: str, loc: tuple[Any, ...]) -> OrganisationError:
        key = tuple(loc)
        while key and key not in self.marks:
            key = key[:-1]
        line, column = self.marks.get(key, (1, 1))
        return OrganisationError(
            message, path=self.path, line=line, column=column, field=".".join(str(p) for p in loc) or None
        )


def read_config(path: Path, model: type[M], what: str) -> tuple[M, ConfigFile]:
    """Parse ``path`` safely and validate it against ``model``; the first problem as one located line."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise OrganisationError("file not found", path=name) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise OrganisationError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", path=name) from exc
    node, data = safeyaml.load_or_fail(text, name, OrganisationError)
    if node is None or not isinstance(data, dict):
        raise OrganisationError(f"{what} is a mapping of fields", path=name, line=1)
    config = ConfigFile(name, safeyaml.positions(node))
    try:
        return model.model_validate(data), config
    except ValidationError as exc:
        errors = exc.errors()
        # a misspelt key also makes the right one "missing": the misspelling is what to point at
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = tuple(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        elif first["type"] == "missing":
            message = "required field is missing"
        raise config.error(message, loc) from exc


# ------------------------------------------------------------------ the organisation's own rules


def _problems(spec: OrganisationSpec) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """What the schema cannot see: ids unique and consistent across sections."""
    stages = {s.id for s in spec.registry_stages}
    total = sum(s.share for s in spec.registry_stages)
    if abs(total - 1.0) > 1e-6:
        yield f"the stages' shares add up to {total:g}, not 1", ("registry_stages",)
    seen: dict[str, tuple[Any, ...]] = {}
    groups: dict[str, tuple[Any, ...]] = {}
    for i, dep in enumerate(spec.departments):
        for key in (dep.id, dep.name):
            if key in seen:
                yield f"{key!r} is already used at {'.'.join(map(str, seen[key]))}", ("departments", i, "id")
            seen[key] = ("departments", i)
        if dep.kind == "town" and dep.groups:
            yield "a town owns no groups: it may warn any group of its own district", ("departments", i, "groups")
        for j, group in enumerate(dep.groups):
            loc: tuple[Any, ...] = ("departments", i, "groups", j)
            for key in (group.id, group.name):
                if key in groups:
                    yield f"group {key!r} is already listed at {'.'.join(map(str, groups[key]))}", (*loc, "id")
                groups[key] = loc
            for stage, chance in group.registry.items():
                if stage not in stages and stage != EVERYONE:
                    known = ", ".join([*sorted(stages), EVERYONE])
                    yield f"unknown life stage {stage!r} (known: {known})", (*loc, "registry", stage)
                elif not 0 < chance <= 1:
                    yield f"a chance between 0 and 1, got {chance}", (*loc, "registry", stage)
    towns = {d.id: (i, d) for i, d in enumerate(spec.departments) if d.kind == "town"}
    district_ids = {d.id for d in spec.districts}
    for town_id, (i, _) in towns.items():
        if town_id not in district_ids:
            yield f"town {town_id!r} has no district with the same id", ("departments", i, "id")
    prefixes: set[str] = set()
    grid_codes: set[str] = set()
    police_grid_ids: set[str] = set()
    for i, dist in enumerate(spec.districts):
        town = towns.get(dist.id)
        if town is None:
            yield (
                f"district {dist.id!r} has no town/street (a department with kind: town and this id)",
                (
                    "districts",
                    i,
                    "id",
                ),
            )
        elif town[1].name != dist.name:
            yield f"the town {dist.id!r} is called {town[1].name} in departments", ("districts", i, "name")
        if dist.grid_prefix in prefixes:
            yield f"grid prefix {dist.grid_prefix} is used by another district", ("districts", i, "grid_prefix")
        prefixes.add(dist.grid_prefix)
        for j, station in enumerate(dist.police_stations):
            for k, pg in enumerate(station.police_grids):
                loc = ("districts", i, "police_stations", j, "police_grids", k)
                if pg.id in police_grid_ids:
                    yield f"police grid {pg.id!r} is listed twice", (*loc, "id")
                police_grid_ids.add(pg.id)
                for n, code in enumerate(pg.grids):
                    if not _GRID_RE.match(code) or code.split("-", 1)[0] != dist.grid_prefix:
                        yield (
                            f"grid {code!r} must be written {dist.grid_prefix}-NN (this district's prefix)",
                            (
                                *loc,
                                "grids",
                                n,
                            ),
                        )
                    elif code in grid_codes:
                        yield f"grid {code} is already covered by another police grid", (*loc, "grids", n)
                    grid_codes.add(code)
    if spec.assessed_by not in seen:
        yield f"unknown department {spec.assessed_by!r}", ("assessed_by",)


def build(spec: OrganisationSpec, path: str) -> Organisation:
    districts = []
    police_grids = []
    grids = []
    for dist in spec.districts:
        codes: list[str] = []
        for station in dist.police_stations:
            for pg in station.police_grids:
                police_grids.append(PoliceGrid(pg.id, pg.name, dist.id, station.name, tuple(pg.grids)))
                for code in pg.grids:
                    grids.append(Grid(code, dist.id, pg.id, station.name))
                    codes.append(code)
        districts.append(District(dist.id, dist.name, dist.grid_prefix, dist.weight, tuple(sorted(codes))))
    stages = tuple(Stage(s.id, s.share) for s in spec.registry_stages)
    stage_share = {s.id: s.share for s in stages}
    departments = []
    segments = []
    for dep in spec.departments:
        departments.append(
            Department(dep.id, dep.name, dep.kind, dep.id if dep.kind == "town" else None, dep.section, dep.duty)
        )
        for g in dep.groups:
            registry = tuple(g.registry.items())
            share = sum(chance * (1.0 if stage == EVERYONE else stage_share[stage]) for stage, chance in registry)
            segments.append(Segment(g.id, g.name, dep.id, round(share, 4), g.section or dep.section, registry))
    return Organisation(
        path=path,
        districts=tuple(districts),
        departments=tuple(departments),
        segments=tuple(segments),
        police_grids=tuple(police_grids),
        grids=tuple(grids),
        stages=stages,
        assessed_by=spec.assessed_by,
    )


def load(path: Path) -> Organisation:
    """The organisation in ``path``, fully checked; raises the first problem as an ``OrganisationError``."""
    spec, config = read_config(path, OrganisationSpec, "organisation.yaml")
    for message, loc in _problems(spec):
        raise config.error(message, loc)
    return build(spec, str(path))


def check(path: Path) -> list[InputError]:
    """``dispatch validate``: the file's problem, if any, as a list."""
    try:
        load(path)
    except InputError as exc:
        return [exc]
    return []
