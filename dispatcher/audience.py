"""The resident registry's import format: reading CSV row by row, and a synthetic generator.

Format (UTF-8, header required)::

    phone,name,district,grid,segments,language,opted_out
    13812345678,张伟,横林镇,HL-03,workers;parents,zh-CN,false

``district`` and ``segments`` take ids or Chinese names; ``segments`` is separated
by ``;``; ``opted_out`` is true/false (or 1/0, 是/否). Rows stream through in
chunks; nothing holds the whole file.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import domain
from .charcheck import bad_character
from .errors import InputError, UsageError
from .organisation import EVERYONE, Organisation
from .phones import InvalidPhone, normalise
from .store import Resident, iter_chunks

COLUMNS = ("phone", "name", "district", "grid", "segments", "language", "opted_out")
_TRUE = {"true", "1", "yes", "y", "是", "t"}
_FALSE = {"false", "0", "no", "n", "否", "f", ""}


@dataclass(frozen=True)
class RowError:
    path: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


def parse_row(row: dict[str, str | None]) -> Resident:
    """One CSV row to a ``Resident``; raises ``ValueError(field, reason)`` on the first problem."""
    for column, value in row.items():
        # a NUL or other control character in a name would be stored and sent; a lone surrogate
        # (undecodable bytes) could not be stored at all
        reason = bad_character(value) if isinstance(value, str) and column is not None else None
        if reason:
            raise ValueError(column, reason)
    raw_phone = (row.get("phone") or "").strip()
    if len(raw_phone) > 32:
        raise ValueError("phone", "longer than 32 characters")
    try:
        phone = normalise(raw_phone)
    except InvalidPhone as exc:
        raise ValueError("phone", str(exc)) from exc
    district_name = (row.get("district") or "").strip()
    district = domain.district(district_name)
    if district is None:
        raise ValueError("district", f"unknown district {district_name!r} (known: {domain.district_names()})")
    grid = (row.get("grid") or "").strip().upper()
    if grid:
        owner = domain.district_of_grid(grid)
        if owner is None or owner.id != district.id:
            raise ValueError("grid", f"grid {grid!r} is not in {district.name} (expected {district.grid_prefix}-NN)")
    segments: list[str] = []
    for name in (row.get("segments") or "").replace("|", ";").split(";"):
        if not name.strip():
            continue
        seg = domain.segment(name)
        if seg is None:
            raise ValueError("segments", f"unknown segment {name.strip()!r} (known: {domain.segment_names()})")
        segments.append(seg.id)
    opted = (row.get("opted_out") or "").strip().lower()
    if opted not in _TRUE | _FALSE:
        raise ValueError("opted_out", f"expected true or false, got {opted!r}")
    name = (row.get("name") or "").strip()
    if len(name) > 64:
        raise ValueError("name", "longer than 64 characters")
    language = (row.get("language") or "zh-CN").strip() or "zh-CN"
    if len(language) > 16:
        raise ValueError("language", "longer than 16 characters (a tag such as zh-CN)")
    return Resident(
        phone=phone,
        name=name,
        district=district.id,
        grid=grid,
        segments=tuple(segments),
        language=language,
        opted_out=opted in _TRUE,
    )


class _RowLines:
    """The stream's lines as the csv reader takes them, keeping the current row's for error reports."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lines: list[str] = []

    def __iter__(self) -> _RowLines:
        return self

    def __next__(self) -> str:
        line = next(self.stream)
        self.lines.append(line)
        return line

    def next_row(self) -> None:
        self.lines = []


def _overlong_column(header: list[str], raw: str) -> str:
    """Which column of a row the csv reader refused as too long (it does not say)."""
    limit = csv.field_size_limit()
    try:
        csv.field_size_limit(len(raw) + 1)  # the module-wide limit, restored at once; imports run one at a time
        cells = next(csv.reader(io.StringIO(raw)), [])
    except csv.Error:
        return "row"
    finally:
        csv.field_size_limit(limit)
    for index, cell in enumerate(cells):
        if len(cell) > limit:
            return header[index] if index < len(header) else "row"
    return "row"


def _rows(reader: csv.DictReader[str], lines: _RowLines, path: Path) -> Iterator[dict[Any, Any] | RowError]:
    """The reader's rows; a row the csv module cannot read becomes a ``RowError`` and reading goes on."""
    while True:
        lines.next_row()
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            header = list(reader.fieldnames or [])
            if "field larger than field limit" in str(exc):
                column = _overlong_column(header, "".join(lines.lines))
                yield RowError(
                    str(path), reader.line_num, column, f"a value longer than {csv.field_size_limit()} characters"
                )
            else:
                yield RowError(str(path), reader.line_num, "row", f"unreadable CSV: {exc}")
            continue
        yield row  # a ragged row carries None keys or values: read_csv reports those


def read_csv(path: Path, stream: TextIO) -> Iterator[Resident | RowError]:
    """Yield a ``Resident`` per good row and a ``RowError`` per bad one, in file order."""
    lines = _RowLines(stream)
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        yield RowError(str(path), 1, "header", f"unreadable CSV: {exc}")
        return
    missing = [c for c in ("phone", "district") if c not in header]
    if missing:
        yield RowError(
            str(path),
            1,
            ",".join(missing),
            f"header lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}",
        )
        return
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        yield RowError(str(path), 1, ",".join(unknown), f"unknown column(s); expected {','.join(COLUMNS)}")
        return
    for row in _rows(reader, lines, path):
        if isinstance(row, RowError):
            yield row
            continue
        line = reader.line_num
        if None in row:  # more cells than the header has columns
            yield RowError(str(path), line, "row", f"{len(header) + len(row[None])} cells, header has {len(header)}")
            continue
        if any(v is None for v in row.values()):
            yield RowError(str(path), line, "row", f"fewer cells than the header's {len(header)} columns")
            continue
        try:
            yield parse_row(row)
        except ValueError as exc:
            field, reason = exc.args if len(exc.args) == 2 else ("row", str(exc))
            yield RowError(str(path), line, field, reason)


# ------------------------------------------------------------------ synthetic registry

_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"  # noqa: E501 - a list of names, clearer on one line
_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国玉兰志强红梅晓东海燕春梅立新德明建华文博子涵梓轩浩然欣怡雨萱一诺思远佳怡宇轩"  # noqa: E501 - as above
_PREFIXES = ("130", "131", "132", "133", "135", "136", "137", "138", "139", "150", "151", "152", "153",
             "155", "156", "157", "158", "159", "176", "177", "180", "181", "182", "183", "186", "187",
             "188", "189", "198", "199")  # fmt: skip


@dataclass(frozen=True)
class ImportResult:
    written: int
    #: rows whose phone number an earlier row of the file already had (the first one is kept)
    duplicates: int
    bad: int


def import_csv(
    path: Path, write: Callable[[list[Resident]], int], *, chunk: int, on_error: Callable[[RowError], None]
) -> ImportResult:
    """Read a registry CSV and hand its good rows to ``write`` in chunks, deduplicated by phone.

    Bad rows are passed to ``on_error`` (as ``file:line``) and counted; the good ones are kept.
    """
    if not path.is_file():
        raise UsageError("file not found", path=str(path))
    seen: set[str] = set()
    bad = dup = written = 0

    def good_rows(stream: TextIO) -> Iterator[Resident]:
        nonlocal bad, dup
        for item in read_csv(path, stream):
            if isinstance(item, RowError):
                bad += 1
                on_error(item)
                continue
            if item.phone in seen:
                dup += 1
                continue
            seen.add(item.phone)
            yield item

    try:
        with path.open(encoding="utf-8-sig", newline="", errors="surrogateescape") as stream:  # bad bytes: a row error
            for rows in iter_chunks(good_rows(stream), chunk):
                written += write(rows)
    except UnicodeDecodeError as exc:
        raise InputError("not UTF-8 text", path=str(path)) from exc
    return ImportResult(written=written, duplicates=dup, bad=bad)


def _segments_for(rng: random.Random, org: Organisation) -> list[str]:
    """One synthetic resident's groups: a life stage by its share, then each group of that stage (and each
    ``everyone`` group) with its chance, all from organisation.yaml; a chance of 1 draws nothing."""
    roll = rng.random()
    stage = org.stages[-1].id
    cumulative = 0.0
    for candidate in org.stages:
        cumulative += candidate.share
        if roll < cumulative:
            stage = candidate.id
            break
    segs: list[str] = []
    for wanted in (stage, EVERYONE):
        for seg in org.segments:
            chance = dict(seg.registry).get(wanted)
            if chance is not None and (chance >= 1 or rng.random() < chance):
                segs.append(seg.id)
    return segs


def generate(size: int, seed: int) -> Iterator[dict[str, str]]:
    """A deterministic synthetic registry: same size and seed, same rows, byte for byte."""
    rng = random.Random(seed)
    org = domain.current()
    weights = [d.weight for d in org.districts]
    seen: set[str] = set()
    produced = 0
    while produced < size:
        phone = rng.choice(_PREFIXES) + f"{rng.randrange(10**8):08d}"
        if phone in seen:
            continue
        seen.add(phone)
        district = rng.choices(org.districts, weights)[0]
        grid = rng.choice(district.grids)
        name = rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2))))
        produced += 1
        yield {
            "phone": phone,
            "name": name,
            "district": district.name,
            "grid": grid,
            "segments": ";".join(_segments_for(rng, org)),
            "language": "zh-CN",
            "opted_out": "true" if rng.random() < 0.01 else "false",
        }


def write_csv(rows: Iterator[dict[str, str]], out: TextIO) -> int:
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow(row)
        n += 1
    return n
