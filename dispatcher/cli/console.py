"""What every command shares: the two consoles, the process's Runtime, JSON output, a few tables."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.table import Table
from rich.text import Text

from .. import domain, logs
from ..runtime import Runtime
from ..settings import Settings
from ..term import SafeConsole

# piped or captured output (CI logs, `make demo | tee`) gets room for six district columns; neither console
# obeys markup or escape sequences in what it prints (term.py): titles and messages come from files and providers
out = SafeConsole(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = SafeConsole(stderr=True, highlight=False, soft_wrap=True)


class State:
    runtime: Runtime | None = None
    #: the level logging was configured with: DISPATCH_LOG_LEVEL, or the command's default
    log_level: str = "WARNING"


def runtime(default_level: str = "WARNING") -> Runtime:
    """The process's Runtime, built once from the environment; long-running commands pass INFO."""
    if State.runtime is None:
        settings = Settings.from_env()
        State.log_level = settings.log_level or default_level
        logs.configure(settings.log_format or ("console" if sys.stderr.isatty() else "json"), State.log_level)
        State.runtime = Runtime(settings)
    return State.runtime


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")


def district_name(district_id: str) -> str:
    d = domain.district(district_id)
    return d.name if d else district_id


def matrix_table(
    title: str,
    districts: list[domain.District],
    totals: dict[str, int],
    cells: dict[str, dict[str, int]],
    opted_out: dict[str, int] | None = None,
) -> Table:
    """Groups down, districts across: six district columns fit a terminal, thirteen groups would not."""
    table = Table(title=title)
    table.add_column("group")
    for d in districts:
        table.add_column(d.name, justify="right")
    table.add_column("total", justify="right")
    table.add_row(
        Text("all residents", style="bold"), *[str(totals.get(d.id, 0)) for d in districts], str(sum(totals.values()))
    )
    if opted_out is not None:
        table.add_row("opted out", *[str(opted_out.get(d.id, 0)) for d in districts], str(sum(opted_out.values())))
    present = {s for c in cells.values() for s in c}
    for seg in domain.SEGMENTS:
        if seg.id not in present:
            continue
        row = [cells.get(d.id, {}).get(seg.id, 0) for d in districts]
        table.add_row(seg.id, *[str(n) for n in row], str(sum(row)))
    return table
