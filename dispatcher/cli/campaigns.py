"""``dispatch validate``, ``dispatch preview`` and ``dispatch schedule list``: campaign files before any run."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import typer
from rich.text import Text

from .. import domain
from ..campaigns import check_paths, load_campaign, upcoming_fires
from ..errors import InputError, UsageError
from ..preview import preview as build_preview
from ..providers.base import CONFIRM_PROMPT
from ..sms import part_lines
from ..targets import load as load_targets
from .console import emit_json, err, matrix_table, out, runtime

schedule_app = typer.Typer(no_args_is_help=True, help="Campaign schedules.")


def validate(paths: list[Path] = typer.Argument(None, help="campaign files or folders (default: campaigns/)")) -> None:
    """Check campaign files (schema, districts, segments, templates, variables, length) and targets.yaml."""
    rt = runtime()  # reads organisation.yaml and themes.yaml: a broken one is reported here (one line, exit 2)
    loaded, errors = check_paths(
        paths or [rt.settings.campaigns_dir],
        rt.settings.templates_dir,
        rt.clock(),
        gateways=rt.known_gateways(),
        plans=rt.plans(),
    )
    targets_ok = rt.settings.targets_path.exists()
    if targets_ok:
        # the assessment's targets are checked with the campaigns: a broken file would only show at report time
        try:
            load_targets(rt.settings.targets_path)
        except InputError as exc:
            errors.append(exc)
            targets_ok = False
    for error in errors:
        err.print(str(error), markup=False)
    if errors:
        raise typer.Exit(2)
    for lc in loaded:
        out.print(f"ok {lc.path} ({lc.campaign.id}: {', '.join(lc.template_names())})", markup=False)
    if targets_ok:
        out.print(f"ok {rt.settings.targets_path} (assessment targets)", markup=False)
    if not paths:
        org = domain.current()
        out.print(
            f"ok {rt.settings.organisation_file or org.path} ({len(org.departments)} departments and towns, "
            f"{len(org.segments)} groups, {len(org.districts)} districts, {len(org.grids)} grids)",
            markup=False,
        )


def preview(
    campaign: Path,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Show who would be messaged and exactly what they would read. Sends nothing."""
    rt = runtime()
    loaded = load_campaign(
        campaign, rt.settings.templates_dir, rt.clock(), gateways=rt.known_gateways(), plans=rt.plans()
    )
    report = build_preview(rt, loaded)
    if as_json:
        emit_json(report.as_dict())
        return
    districts = [d for d in domain.DISTRICTS if d.id in report.by_district]
    totals = {d.id: report.district_totals()[d.id] for d in districts}
    out.print(
        matrix_table(f"{report.title} — audience (opted-out excluded)", districts, totals, report.by_district_segment)
    )
    out.print(Text.assemble("\n", ("audience by district and grid", "bold"), " (opted-out excluded)"))
    for d in districts:
        grids = report.by_district_grid.get(d.id, {})
        listed = " · ".join(f"{g} {n}" for g, n in grids.items())
        out.print(f"{d.name} {totals[d.id]} in {len(grids)} grid(s): {listed}", markup=False)
    for v in report.variants:
        marker = " (this quarter)" if v.template == report.template_now else ""
        if report.channel == "voice":
            out.print(Text.assemble("\n", (str(v.template), "bold"), f"{marker}: a call says, in Mandarin, twice:"))
            out.print(f"{v.text} {CONFIRM_PROMPT}", markup=False)
            continue
        out.print(
            Text.assemble(
                "\n",
                (str(v.template), "bold"),
                f"{marker}: {v.encoding}, {v.chars} characters, {v.parts} part(s)",
            )
        )
        for line in part_lines(str(v.text)):  # where each part ends, as handsets and providers split it
            out.print(line, markup=False)
    if report.channel == "voice":
        out.print(f"\nrecipients {report.recipients}, opted out {report.opted_out}, calls {report.total_parts}")
        return
    out.print(f"\nrecipients {report.recipients}, opted out {report.opted_out}, total parts {report.total_parts}")
    costs = report.district_costs()
    out.print(f"cost at {report.price_per_part:g} CNY a part (DISPATCH_PART_PRICES):", markup=False)
    for d in districts:
        parts = report.parts_by_district.get(d.id, 0)
        out.print(f"  {d.name}: {parts} parts, {costs.get(d.id, 0.0):.2f} CNY", markup=False)
    budget = ""
    if report.budget is not None:
        verdict = "over" if report.cost > report.budget else "within"
        budget = f" (budget {report.budget:g} CNY: {verdict} it)"
    out.print(f"  total: {report.total_parts} parts, {report.cost:.2f} CNY{budget}", markup=False)
    if report.personalising is not None:
        p = report.personalising
        how = f"up to {p.per_call} numbers a call" if p.per_call > 1 else "one number a call"
        out.print(f"what the name costs (the gateway takes {how}):", markup=False)
        out.print(f"  {p.line()}", markup=False)


def _when(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        message = f"expected an ISO date or date-time such as 2021-01-01, got {text!r}"
        raise UsageError(message, field=option) from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=ZoneInfo("Asia/Shanghai"))
    return value.astimezone(UTC)


@schedule_app.command("list")
def schedule_list(
    since: str | None = typer.Option(None, "--from", help="ISO date(-time), Shanghai time if no zone"),
    until: str | None = typer.Option(None, "--until", help="ISO date(-time), exclusive"),
    count: int = typer.Option(5, "--count", min=1, max=1000, help="fire times per campaign"),
    campaigns: Path | None = typer.Option(None, "--campaigns", help="folder of campaign files"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every scheduled campaign's next fire times (from now unless --from), with the template of each fire."""
    rt = runtime()
    loaded, errors = check_paths(
        [campaigns or rt.settings.campaigns_dir],
        rt.settings.templates_dir,
        rt.clock(),
        gateways=rt.known_gateways(),
        plans=rt.plans(),
    )
    if errors:
        raise errors[0]
    start = _when(since, "--from") or rt.clock()
    end = _when(until, "--until")
    items = upcoming_fires(loaded, start, end, count)
    if as_json:
        emit_json({"campaigns": items})
        return
    if not items:
        out.print("no campaign has a schedule", markup=False)
    for item in items:
        plan = item["plan"]
        within = f", plan {plan['id']} {plan['start']} to {plan['end']}" if plan else ""
        out.print(f"{item['campaign_id']} ({item['kind']}, {item['timezone']}{within}):", markup=False)
        for fire in item["fires"]:
            theme = f"  {fire['theme']}" if fire["theme"] else ""
            out.print(f"  {fire['fire_time']}  {fire['template']}{theme}", markup=False)
        if not item["fires"]:
            out.print("  no fire in this range" + (" (the plan's period is over)" if plan else ""), markup=False)
