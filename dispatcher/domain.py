"""The programme's vocabulary: districts, population groups and departments, read from organisation.yaml.

Taken from the Changzhou Economic Development Zone's 2021-2023 anti-telecom-fraud
plan (``shared/seed``): six towns/streets run their own actions in grids (网格 + 警格),
and each population group's warnings are owned by one department, which is assessed on
them. Campaign files and CSV rows may name a district, group or department by its id
(``henglin``) or its Chinese name (``横林镇``); everything stored uses the id.

The data comes from ``organisation.yaml`` (``organisation.py``): the project's, once a
process's settings name it (``use_file``, done by ``Runtime``), else the copy shipped in
the package. It is read once per file and kept; ``DISTRICTS``, ``DEPARTMENTS`` and
``SEGMENTS`` are looked up on the organisation in use each time they are read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .organisation import (
    DEFAULT_PATH,
    Department,
    District,
    Grid,
    Organisation,
    PoliceGrid,
    Segment,
    load,
)

__all__ = [
    "DEPARTMENTS",
    "DISTRICTS",
    "GRIDS_PER_DISTRICT",
    "SEGMENTS",
    "Department",
    "District",
    "Grid",
    "PoliceGrid",
    "Segment",
    "current",
    "department",
    "department_names",
    "district",
    "district_names",
    "district_of_grid",
    "grid",
    "police_grid",
    "police_grid_of",
    "responsible_for",
    "segment",
    "segment_names",
    "segments_of",
    "use",
    "use_file",
]

if TYPE_CHECKING:  # looked up on the organisation in use by the module's __getattr__ below
    DISTRICTS: tuple[District, ...]
    DEPARTMENTS: tuple[Department, ...]
    SEGMENTS: tuple[Segment, ...]
    #: the most grids any district has (the synthetic registry draws from each district's own list)
    GRIDS_PER_DISTRICT: int

_lock = threading.Lock()
_loaded: dict[tuple[str, int], Organisation] = {}
_active: Organisation | None = None


def _load_cached(path: Path) -> Organisation:
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0  # load() reports the missing file
    key = (str(path.resolve()), stamp)
    with _lock:
        found = _loaded.get(key)
    if found is None:
        found = load(path)
        with _lock:
            _loaded[key] = found
    return found


def use_file(path: Path | None) -> Organisation:
    """Use the organisation in ``path`` (None: the packaged default) from now on in this process.

    Raises ``OrganisationError`` (one located line, exit 2) if the file is broken; the
    organisation in use is then left as it was.
    """
    return use(_load_cached(path or DEFAULT_PATH))


def use(org: Organisation) -> Organisation:
    """Use ``org`` from now on; returns it (tests put the previous one back with ``use(previous)``)."""
    global _active
    with _lock:
        _active = org
    return org


def current() -> Organisation:
    """The organisation in use: the one last given to ``use``/``use_file``, else the packaged default."""
    org = _active
    if org is None:
        org = use(_load_cached(DEFAULT_PATH))
    return org


def __getattr__(name: str) -> Any:
    if name == "DISTRICTS":
        return current().districts
    if name == "DEPARTMENTS":
        return current().departments
    if name == "SEGMENTS":
        return current().segments
    if name == "GRIDS_PER_DISTRICT":
        return max((len(d.grids) for d in current().districts), default=0)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def district(name: str) -> District | None:
    found: District | None = current().find("district", name)
    return found


def segment(name: str) -> Segment | None:
    found: Segment | None = current().find("segment", name)
    return found


def department(name: str) -> Department | None:
    found: Department | None = current().find("department", name)
    return found


def police_grid(name: str) -> PoliceGrid | None:
    """A police grid (警格) by its id or name."""
    found: PoliceGrid | None = current().find("police_grid", name)
    return found


def grid(code: str) -> Grid | None:
    """A grid (网格) listed in the organisation, with its police grid and station."""
    return current().grid(code)


def police_grid_of(code: str) -> PoliceGrid | None:
    """The police grid (警格) covering the grid ``code`` (``HL-03``), or None for a grid not listed."""
    found = current().grid(code)
    return police_grid(found.police_grid) if found else None


def segments_of(department_id: str) -> tuple[Segment, ...]:
    """The groups a department is responsible for (none for a town: it covers its own district)."""
    return tuple(s for s in current().segments if s.owner == department_id)


def responsible_for(department_id: str, segment_id: str) -> bool:
    """Whether a department may warn a group: it owns the group, or it is a town (its own district's people)."""
    dep = department(department_id)
    seg = segment(segment_id)
    if dep is None or seg is None:
        return False
    return dep.kind == "town" or seg.owner == dep.id


def district_names() -> str:
    return ", ".join(f"{d.id} ({d.name})" for d in current().districts)


def segment_names() -> str:
    return ", ".join(f"{s.id} ({s.name})" for s in current().segments)


def department_names() -> str:
    return ", ".join(f"{d.id} ({d.name})" for d in current().departments)


def district_of_grid(grid: str) -> District | None:
    """The district a grid code belongs to, by its prefix (a registry may use grids the file does not list)."""
    return current().district_of_prefix(grid.split("-", 1)[0])
