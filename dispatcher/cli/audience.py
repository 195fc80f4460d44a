"""``dispatch audience import``, ``generate`` and ``stats``: the resident registry."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .. import domain
from ..audience import RowError, generate, import_csv, write_csv
from .console import emit_json, err, matrix_table, out, runtime

audience_app = typer.Typer(no_args_is_help=True, help="The resident registry.")


@audience_app.command("import")
def audience_import(file: Path, chunk: int = typer.Option(1000, help="rows per database write")) -> None:
    """Import residents from CSV: bad rows reported as file:line, good rows kept, deduplicated by phone."""
    rt = runtime()

    def report(error: RowError) -> None:
        err.print(str(error), markup=False)

    result = import_csv(file, rt.store.upsert_residents, chunk=chunk, on_error=report)
    out.print(
        f"imported {result.written} residents from {file} ({result.duplicates} duplicate phone rows merged, "
        f"{result.bad} bad rows)",
        markup=False,
    )
    if result.bad:
        raise typer.Exit(2)


@audience_app.command("generate")
def audience_generate(
    size: int = typer.Option(..., "--size", min=1, help="number of residents"),
    seed: int = typer.Option(1, "--seed"),
    output: Path | None = typer.Option(None, "--output", "-o", help="file to write (default: standard output)"),
) -> None:
    """Write a deterministic synthetic registry in the import format (groups and grids from organisation.yaml)."""
    runtime()  # the project's organisation.yaml, checked (a broken one: one line, exit 2)
    if output is None:
        write_csv(generate(size, seed), sys.stdout)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8", newline="") as fh:
        n = write_csv(generate(size, seed), fh)
    err.print(f"wrote {n} residents to {output}", markup=False)


@audience_app.command("stats")
def audience_stats(as_json: bool = typer.Option(False, "--json")) -> None:
    """Residents by district and population group."""
    stats = runtime().store.audience_stats()
    if as_json:
        emit_json(stats)
        return
    totals = {d.id: stats["by_district"].get(d.id, {}).get("residents", 0) for d in domain.DISTRICTS}
    opted = {d.id: stats["by_district"].get(d.id, {}).get("opted_out", 0) for d in domain.DISTRICTS}
    out.print(
        matrix_table(
            "residents by district and group", list(domain.DISTRICTS), totals, stats["by_district_segment"], opted
        )
    )
