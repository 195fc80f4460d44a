"""The programme's fixed vocabulary: districts, population groups and departments.

Taken from the Changzhou Economic Development Zone's 2021-2023 anti-telecom-fraud
plan (``shared/seed``): six towns/streets run their own actions in grids, and each
population group's warnings are owned by one department, which is assessed on
them. Campaign files and CSV rows may name a district, group or department by its
id (``henglin``) or its Chinese name (``横林镇``); everything stored uses the id.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class District:
    id: str
    name: str
    #: prefix of this district's grid codes, e.g. HL-07
    grid_prefix: str
    #: rough share of the zone's population, used by the synthetic registry
    weight: float


@dataclass(frozen=True)
class Department:
    id: str
    name: str


@dataclass(frozen=True)
class Segment:
    id: str
    name: str
    owner: str
    #: share of residents in this group, used by the synthetic registry
    share: float


DISTRICTS: tuple[District, ...] = (
    District("henglin", "横林镇", "HL", 0.22),
    District("yaoguan", "遥观镇", "YG", 0.20),
    District("hengshanqiao", "横山桥镇", "HSQ", 0.16),
    District("lucheng", "潞城街道", "LC", 0.16),
    District("dingyan", "丁堰街道", "DY", 0.12),
    District("qishuyan", "戚墅堰街道", "QSY", 0.14),
)

#: grids per district in the synthetic registry (网格); real registries may use any code with the prefix
GRIDS_PER_DISTRICT = 12

DEPARTMENTS: tuple[Department, ...] = (
    Department("police", "公安分局"),
    Department("social_security", "社会保障局"),
    Department("social_affairs", "社会事业局"),
    Department("economic_development", "经济发展局"),
    Department("tech_finance", "科技金融局"),
    Department("tax", "税务局"),
    Department("organisation", "组织部"),
    Department("party_mass", "党群工作部"),
    Department("admin_approval", "行政审批局"),
)

SEGMENTS: tuple[Segment, ...] = (
    Segment("retirees", "退休人员", "social_security", 0.18),
    Segment("students", "学生", "social_affairs", 0.12),
    Segment("parents", "学生家长", "social_affairs", 0.20),
    Segment("enterprise_owners", "企业主", "economic_development", 0.04),
    Segment("accountants", "企业财会人员", "economic_development", 0.05),
    Segment("gatekeepers", "企业门卫", "economic_development", 0.02),
    Segment("financial_staff", "金融机构从业人员", "tech_finance", 0.03),
    Segment("taxpayers", "纳税人", "tax", 0.25),
    Segment("party_members", "党员", "organisation", 0.08),
    Segment("workers", "职工", "party_mass", 0.35),
    Segment("youth", "青年", "party_mass", 0.22),
    Segment("women", "妇女", "party_mass", 0.48),
    Segment("service_hall_visitors", "政务服务中心办事群众", "admin_approval", 0.10),
)

_DISTRICT_LOOKUP = {key: d for d in DISTRICTS for key in (d.id, d.name)}
_SEGMENT_LOOKUP = {key: s for s in SEGMENTS for key in (s.id, s.name)}
_DEPARTMENT_LOOKUP = {key: d for d in DEPARTMENTS for key in (d.id, d.name)}


def district(name: str) -> District | None:
    return _DISTRICT_LOOKUP.get(name.strip())


def segment(name: str) -> Segment | None:
    return _SEGMENT_LOOKUP.get(name.strip())


def department(name: str) -> Department | None:
    return _DEPARTMENT_LOOKUP.get(name.strip())


def district_names() -> str:
    return ", ".join(f"{d.id} ({d.name})" for d in DISTRICTS)


def segment_names() -> str:
    return ", ".join(f"{s.id} ({s.name})" for s in SEGMENTS)


def department_names() -> str:
    return ", ".join(f"{d.id} ({d.name})" for d in DEPARTMENTS)


def district_of_grid(grid: str) -> District | None:
    prefix = grid.split("-", 1)[0].upper()
    for d in DISTRICTS:
        if d.grid_prefix == prefix:
            return d
    return None
