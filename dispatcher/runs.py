"""Creating, following and resuming runs.

``start_run`` snapshots the campaign and its template (text and sha256), writes
one delivery row per selected resident in the database and enqueues one Dramatiq
message per batch. ``resume_run`` reconciles rows a crash left in ``sending``
(asking the gateway which keys it has) and re-enqueues whatever is pending.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from .actors import declared
from .approvals import check_resume, gate
from .batch import context_from_run, run_campaign
from .campaigns import LoadedCampaign, parse_duration
from .channels import VOICE, channel_of, voice_script
from .costs import cny, estimate_price, over_budget
from .errors import UsageError
from .keys import delivery_key
from .phones import InvalidPhone, normalise
from .providers.base import Gateway, LookupRequest, SendResult
from .store import (
    DELIVERED,
    FAILED,
    SENT,
    UNCONFIRMED,
    UNDELIVERED,
    UNKNOWN,
    AudienceFilter,
    Claimed,
    CreatedRun,
    Outcome,
    RunRecord,
    RunSpec,
)

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.runs")


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def audience_filter(loaded: LoadedCampaign) -> AudienceFilter:
    a = loaded.campaign.audience
    return AudienceFilter(
        districts=tuple(a.district_ids()),
        grids=tuple(a.grids),
        segments=tuple(a.segment_ids()),
        exclude_segments=tuple(a.excluded_segment_ids()),
    )


def run_spec(
    runtime: Runtime, loaded: LoadedCampaign, *, fire_time: datetime | None = None, as_of: datetime | None = None
) -> RunSpec:
    """The run's snapshot; its theme is the one of the fire time, else of ``as_of``, else of now."""
    c = loaded.campaign
    now = runtime.clock()
    template_name = loaded.template_for(fire_time or as_of or now)
    source = loaded.templates[template_name]
    return RunSpec(
        run_id=new_run_id(now),
        campaign_id=c.id,
        title=c.title,
        owner=(c.owner_department().id if c.owner_department() else c.owner),  # type: ignore[union-attr]
        channel=c.channel,
        priority=c.priority,
        reason=c.reason,
        # the providers the run sends through, in failover order (the column is 32 characters wide)
        gateway=(
            runtime.settings.ringback_gateway
            if c.channel == "ringback"
            else runtime.settings.voice_gateway
            if c.channel == "voice"
            else ",".join(c.gateways or runtime.settings.gateways)
        )[:32],
        campaign_path=str(loaded.path),
        campaign_yaml=loaded.located.text,
        campaign_sha256=loaded.located.sha256,
        template_name=template_name,
        template_text=source.text,
        template_sha256=source.sha256,
        send_by=c.send_by_datetime(),
        batch_size=runtime.settings.batch_size,
        fire_time=fire_time,
        as_of=as_of,
        signature=c.signature,
        opt_out_text=c.opt_out_text,
        part_prices=tuple(sorted(runtime.settings.part_prices.items())),
    )


def enqueue_batches(runtime: Runtime, run_id: str, batches: list[int], priority: str | None = None) -> int:
    """One message per batch, on the run's lane: urgent runs never queue behind bulk work."""
    if priority is None:
        priority = runtime.store.get_run(run_id).priority
    actor = declared(runtime)["send_urgent_batch" if priority == "urgent" else "send_batch"]
    for batch_no in batches:
        actor.send(run_id, batch_no)
    return len(batches)


def refuse_pointless_run(runtime: Runtime, loaded: LoadedCampaign) -> int:
    """Refuse (exit 2, nothing written) a run that could send nobody; return how many it would message.

    A run past its ``send_by`` would only expire its rows, and one whose audience is empty (or
    entirely opted out) would be recorded as "completed" having reached no one: both are an
    operator's mistake to be told about, not a run to record.
    """
    c = loaded.campaign
    send_by = c.send_by_datetime()
    now = runtime.clock()
    if send_by is not None and send_by <= now:
        message = f"{send_by.isoformat()} has passed (now {now.isoformat(timespec='seconds')}): nothing could be sent"
        raise loaded.located.error(message, ("send_by",))
    matrix = runtime.store.audience_matrix(audience_filter(loaded))
    selected = sum(v["selected"] for v in matrix["by_district"].values())
    eligible = selected - sum(v["opted_out"] for v in matrix["by_district"].values())
    if eligible <= 0:
        why = "no resident matches it" if selected == 0 else f"all {selected} selected residents opted out"
        raise loaded.located.error(f"{why}: nothing to send", ("audience",))
    refuse_oversized_voice(runtime, loaded, eligible)
    return eligible


def refuse_oversized_voice(runtime: Runtime, loaded: LoadedCampaign, eligible: int | None = None) -> None:
    """Refuse (exit 2, nothing written) a voice campaign that would call more than DISPATCH_VOICE_MAX_AUDIENCE.

    Calls are for small, urgent audiences: each occupies a line for half a minute or more, and a
    mistaken audience of thousands would ring every one of them.
    """
    if loaded.campaign.channel != "voice":
        return
    if eligible is None:
        matrix = runtime.store.audience_matrix(audience_filter(loaded))
        eligible = sum(v["selected"] - v["opted_out"] for v in matrix["by_district"].values())
    limit = runtime.settings.voice_max_audience
    if eligible > limit:
        raise loaded.located.error(
            f"a voice campaign may call at most {limit} people (DISPATCH_VOICE_MAX_AUDIENCE); "
            f"this audience has {eligible}: narrow it or send SMS",
            ("audience",),
        )


def start_run(
    runtime: Runtime,
    loaded: LoadedCampaign,
    *,
    fire_time: datetime | None = None,
    actor: str = "operator",
    as_of: datetime | None = None,
    again_reason: str | None = None,
    fence: tuple[str, str, int] | None = None,
) -> CreatedRun:
    """Create the run and its delivery rows, then enqueue its batches. Returns the run summary.

    A run through a real gateway needs the campaign's current version approved by a second
    operator (``approvals.gate``: ``NotApproved``, exit 2, before anything is written).
    """
    refuse_oversized_voice(runtime, loaded)
    approval = gate(runtime, loaded, actor=actor)
    spec = dataclasses.replace(
        run_spec(runtime, loaded, fire_time=fire_time, as_of=as_of),
        actor=actor,
        again_reason=again_reason,
        version_sha256=approval.version,
        approved_by=approval.approved_by,
        approved_at=approval.approved_at,
        approval_exempt=approval.exempt,
    )
    created = runtime.store.create_run(spec, audience_filter(loaded), fence=fence)
    with structlog.contextvars.bound_contextvars(run_id=spec.run_id, campaign_id=spec.campaign_id):
        # workers may start from here (benchmarks time from it)
        created = dataclasses.replace(created, enqueue_started_at=time.time())
        enqueue_batches(runtime, spec.run_id, list(range(created.batches)), spec.priority)
        log.info("run.created", total=created.total, pending=created.pending, batches=created.batches)
    return created


def start_manual_run(
    runtime: Runtime, loaded: LoadedCampaign, *, as_of: datetime | None = None, again_reason: str | None = None
) -> CreatedRun:
    """An operator's run: refused (exit 2) if the campaign already ran within its frequency period,
    unless the operator says ``--again`` with a reason. Taken under the campaign's lock, so two
    operators starting the same campaign at once cannot both create a run."""
    c = loaded.campaign
    store = runtime.store
    with store.coordination.operator_lock(f"campaign:{c.id}"):
        if c.priority == "bulk" and not again_reason:
            period = parse_duration(c.frequency_cap.per if c.frequency_cap else runtime.settings.frequency_cap_period)
            recent = store.coordination.recent_runs(c.id, runtime.clock() - period)
            if recent:
                last = recent[-1]
                raise UsageError(
                    f"campaign {c.id} already has run {last.id} ({last.status}, created "
                    f"{last.created_at:%Y-%m-%d %H:%M} UTC) within its frequency period {period}; "
                    "to send it again give --again --reason TEXT",
                    field="again",
                )
        return start_run(runtime, loaded, actor="operator", as_of=as_of, again_reason=again_reason)


@dataclass(frozen=True)
class DryRunRow:
    phone: str
    district: str
    text: str
    parts: int
    encoding: str
    skipped: str | None


def dry_run(runtime: Runtime, loaded: LoadedCampaign, as_of: datetime | None = None) -> Iterator[DryRunRow]:
    """Select and render exactly as a run would, streaming; writes and sends nothing."""
    composer = loaded.composer(as_of or runtime.clock())
    voice = loaded.campaign.channel == VOICE
    for row in runtime.store.iter_audience(audience_filter(loaded)):
        if row.opted_out:
            yield DryRunRow(row.phone, row.district, "", 0, "", "opted_out")
            continue
        recipient = {"name": row.name, "district": row.district, "grid": row.grid}
        if voice:
            yield DryRunRow(row.phone, row.district, voice_script(composer, recipient), 1, "voice", None)
            continue
        text, seg = composer.render(recipient)
        yield DryRunRow(row.phone, row.district, text, seg.parts, seg.encoding, None)


@dataclass
class DryRunTotals:
    """What a dry run would send, in total and per district, and what it would cost."""

    campaign_id: str
    recipients: int = 0
    skipped: int = 0
    parts: int = 0
    #: district id -> {"recipients", "skipped", "parts"}
    by_district: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    #: CNY per part the estimate uses (costs.estimate_price) and the campaign's budget, if any
    price_per_part: float = 0.0
    budget: float | None = None

    @property
    def cost(self) -> float:
        return cny(self.parts * self.price_per_part)

    def district_costs(self) -> dict[str, float]:
        return {d: cny(b["parts"] * self.price_per_part) for d, b in self.by_district.items()}

    def as_dict(self) -> dict[str, Any]:
        costs = self.district_costs()
        return {
            "campaign_id": self.campaign_id,
            "dry_run": True,
            "recipients": self.recipients,
            "skipped": self.skipped,
            "parts": self.parts,
            "price_per_part": self.price_per_part,
            "cost_cny": self.cost,
            "budget_cny": self.budget,
            "by_district": {d: {**b, "cost_cny": costs[d]} for d, b in self.by_district.items()},
        }


def run_price(runtime: Runtime, loaded: LoadedCampaign) -> float:
    """CNY per part an estimate of this campaign uses: its dearest provider (ringback and voice calls: not
    priced, the SMS part prices say nothing about them)."""
    c = loaded.campaign
    if c.channel in ("ringback", VOICE):
        return 0.0
    return estimate_price(c.gateways or runtime.settings.gateways, runtime.settings.part_prices)


def refuse_over_budget(runtime: Runtime, loaded: LoadedCampaign, as_of: datetime | None = None) -> None:
    """Refuse (exit 2, one line at ``budget`` in the file) a run estimated to cost more than its budget."""
    budget = loaded.campaign.budget
    if budget is None:
        return
    totals = dry_run_totals(runtime, loaded, as_of)
    why = over_budget(budget, totals.parts, totals.price_per_part)
    if why:
        raise loaded.located.error(why, ("budget",))


def dry_run_totals(runtime: Runtime, loaded: LoadedCampaign, as_of: datetime | None = None) -> DryRunTotals:
    """Count what ``dry_run`` renders: recipients and parts, opted-out people skipped."""
    totals = DryRunTotals(
        campaign_id=loaded.campaign.id, price_per_part=run_price(runtime, loaded), budget=loaded.campaign.budget
    )
    for row in dry_run(runtime, loaded, as_of):
        bucket = totals.by_district.setdefault(row.district, {"recipients": 0, "skipped": 0, "parts": 0})
        if row.skipped:
            totals.skipped += 1
            bucket["skipped"] += 1
        else:
            totals.recipients += 1
            totals.parts += row.parts
            bucket["recipients"] += 1
            bucket["parts"] += row.parts
    return totals


def settle_keys(run_id: str, phones: list[str]) -> list[str]:
    """The idempotency keys of the rows of ``phones`` in the run (numbers as an operator types them)."""
    try:
        return [delivery_key(run_id, normalise(p)) for p in phones]
    except InvalidPhone as exc:
        raise UsageError(str(exc), field="phone") from exc


def why_still_open(runtime: Runtime, run_id: str, st: RunStatus) -> str:
    """Why a resumed run is not done, for the operator ("" when nothing is open)."""
    if not st.open:
        return ""
    counts = st.counts
    parts = []
    if counts.get("sending"):
        holders = runtime.store.sending_holders(run_id)
        who = ", ".join(f"{n} by {h}" for h, n in sorted(holders.items()))
        parts.append(
            f"{counts['sending']} rows in flight held by live workers ({who}); they are reconciled when "
            f"those workers record or are gone for {runtime.settings.worker_stale_after}s: resume again then"
        )
    if counts.get("unknown"):
        parts.append(f"{counts['unknown']} rows unknown (the provider could not say): `dispatch settle {run_id}`")
    if counts.get("pending"):
        parts.append(f"{counts['pending']} rows pending (waiting for a retry, a worker or the send window)")
    if st.halted:
        parts.append(f"halted: {st.halted}")
    return "; ".join(parts)


def run_gateway(runtime: Runtime, run: RunRecord) -> Gateway:
    """The gateway a run's messages went through, as its channel says (SMS or voice)."""
    return channel_of(context_from_run(run)).gateway(runtime, context_from_run(run))


#: orphans looked up per gateway call when a leader reconciles: between calls it renews its lease
LOOKUP_CHUNK = 20


def reconcile_orphans(
    runtime: Runtime,
    run_id: str,
    orphans: list[Claimed],
    actor: str,
    leading: Callable[[], bool] | None = None,
) -> tuple[int, int]:
    """Settle rows left in ``sending``: the gateway has the key -> ``sent``; else back to ``pending``.

    Both moves are fenced on the claim token read with the orphan list, so a row a live worker
    claimed since is left alone; requeueing (and marking unknown) also on the row's ``claimed_at``,
    so a row whose worker came back and renewed its claim during the lookups is left to it (it
    may be handing it over right now; a requeue would send it twice). Returns (found sent, requeued).
    ``leading`` (the scheduler's lease, renewed by each call): asked between lookups, which may take
    longer than the lease (one HTTP request per key), and before anything moves, so a leader that
    lost its lease meanwhile acts on nothing and one still leading keeps its lease.
    """
    if not orphans:
        return 0, 0
    store = runtime.store
    run = store.get_run(run_id)
    if run.channel.startswith("ringback"):
        # enrolment and restore are idempotent (ringback adapters): doing one again is safe
        return 0, store.requeue(orphans, actor=actor)
    gateway = run_gateway(runtime, run)
    if not gateway.can_lookup:
        # the provider cannot say what it took: resending could double-send, an operator decides
        settled = store.provider_events.mark_unknown(
            run_id,
            [o.id for o in orphans],
            reason="orphan_no_lookup",
            seen={o.id: (o.claim_token, o.claimed_at) for o in orphans},
        )
        log.warning("run.orphans_unknown", orphans=len(orphans), marked=settled)
        return 0, 0
    requests = [LookupRequest(o.key, o.phone, "", o.claimed_at) for o in orphans]
    known: dict[str, SendResult] = {}
    if leading is None:
        known = gateway.lookup(requests)
    else:
        for start in range(0, len(requests), LOOKUP_CHUNK):
            if not leading():
                log.warning("run.reconcile_abandoned", reason="lead lost", orphans=len(orphans))
                return 0, 0
            known.update(gateway.lookup(requests[start : start + LOOKUP_CHUNK]))
        if not leading():
            log.warning("run.reconcile_abandoned", reason="lead lost", orphans=len(orphans))
            return 0, 0
    outcomes = [
        Outcome(
            id=o.id,
            key=o.key,
            run_id=run_id,
            state=SENT,
            attempt=o.attempts,
            # a failover list says which of its providers holds the message
            gateway=known[o.key].gateway or gateway.name,
            outcome="found",
            provider_id=known[o.key].provider_id,
            reason="reconciled",
            claim_token=o.claim_token,
        )
        for o in orphans
        if o.key in known
    ]
    store.record(outcomes, actor=actor)
    requeued = store.requeue([o for o in orphans if o.key not in known], actor=actor)
    log.info("run.reconciled", orphans=len(orphans), already_sent=len(outcomes), requeued=requeued)
    return len(outcomes), requeued


def resume_run(runtime: Runtime, run_id: str) -> dict[str, int]:
    """Reconcile rows orphaned in ``sending`` by a dead worker, then re-enqueue pending batches.

    An orphaned row the gateway already holds becomes ``sent`` (with its provider id),
    never sent again; one the gateway never saw goes back to ``pending``. Rows held by a
    worker that is still alive are left to it. Taken under the campaign's lock: two resumes
    (or a resume and a run) of one campaign at once cannot work from the same stale list.
    """
    store = runtime.store
    run = store.get_run(run_id)
    check_resume(runtime, run)  # a drill resumed through a real gateway needs its version approved
    with store.coordination.operator_lock(f"campaign:{run.campaign_id}"):
        return _resume_locked(runtime, run_id)


def _resume_locked(runtime: Runtime, run_id: str) -> dict[str, int]:
    store = runtime.store
    run = store.get_run(run_id)
    orphans = store.orphans(run_id, runtime.settings.worker_stale_after)
    with structlog.contextvars.bound_contextvars(run_id=run_id, campaign_id=run.campaign_id):
        found_sent, requeued = reconcile_orphans(runtime, run_id, orphans, actor="resume")
        store.provider_events.drain_status_backlog()  # delivery reports that overtook the recording of their ids
        unknown_found, unknown_requeued = reconcile_unknown(runtime, run_id)
        found_sent += unknown_found
        requeued += unknown_requeued
        if run.status in ("cancelled",):
            return {"orphans": len(orphans), "already_sent": found_sent, "requeued": requeued, "batches": 0}
        if run.halted:
            store.control.clear_halt(run_id)
        if run.status == "paused":
            store.control.unpause_run(run_id)
            log.info("run.resumed")
        if run.status == "completed" and (requeued or store.counts(run_id).get("pending")):
            store.set_run_status(run_id, "running")
        batches = store.pending_batches(run_id)
        enqueue_batches(runtime, run_id, batches)
        store.finish_if_done(run_id)
    return {"orphans": len(orphans), "already_sent": found_sent, "requeued": requeued, "batches": len(batches)}


def reconcile_unknown(runtime: Runtime, run_id: str) -> tuple[int, int]:
    """Settle rows an ambiguous reply left ``unknown``: ask the gateway, never resend blindly.

    The gateway looks for a message to that number with that text since the attempt
    (Twilio: list messages to the number). Found -> ``sent`` with the provider's id;
    not found -> ``pending``, sent again by the next batch. Returns (found, requeued).
    """
    store = runtime.store
    rows = store.provider_events.unknown_rows(run_id)
    if not rows:
        return 0, 0
    if store.get_run(run_id).channel.startswith("ringback"):
        # ringback enrol/restore calls are idempotent: try them again rather than ask
        return store.provider_events.settle_unknown(run_id, {}, [r.id for r in rows], gateway="ringback")
    gateway = run_gateway(runtime, store.get_run(run_id))
    if not gateway.can_lookup:
        # the provider cannot tell us what it took: resending could double-send, so an operator decides
        log.warning("run.unknown_left", unknown=len(rows), gateway=gateway.name)
        return 0, 0
    known = gateway.lookup([LookupRequest(r.key, r.phone, r.body or "", r.claimed_at or r.updated_at) for r in rows])
    # found rows are recorded per provider that holds them (a failover list asks each of its providers)
    by_gateway: dict[str, dict[int, str]] = {}
    for r in rows:
        if r.key in known:
            result = known[r.key]
            by_gateway.setdefault(result.gateway or gateway.name, {})[r.id] = result.provider_id
    missing = [r.id for r in rows if r.key not in known]
    found_n, requeued = 0, 0
    for name, found in by_gateway.items():
        found_n += store.provider_events.settle_unknown(run_id, found, [], gateway=name)[0]
    if missing:
        requeued = store.provider_events.settle_unknown(run_id, {}, missing, gateway=gateway.name)[1]
    log.info("run.unknown_reconciled", unknown=len(rows), found=found_n, requeued=requeued)
    return found_n, requeued


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


@dataclass(frozen=True)
class RunStatus:
    """A run's state for an operator: its record, its rows by state and district, whether it is stalled.

    What ``dispatch status`` prints and what ``--json`` emits (``to_json``, whose keys and their
    order are the command's output format); ``follow_run`` polls it until nothing is open.
    """

    run_id: str
    campaign_id: str
    title: str
    status: str
    channel: str
    gateway: str
    fire_time: datetime | None
    #: the as-of date in the campaign's time zone, as the operator gave it
    as_of: datetime | None
    created_at: datetime | None
    finished_at: datetime | None
    template: str
    template_sha256: str
    campaign_sha256: str
    total: int
    batches: int
    counts: dict[str, int]
    by_district: dict[str, dict[str, int]]
    parts_sent: int
    #: rows still needing work (pending, sending, unknown)
    open: int
    failed: int
    halted: str | None
    #: rows of a running run that should be moving and are not (see ``stall``)
    stalled: int
    last_progress: datetime | None
    #: messages per provider and the failovers between them (``SqlStore.by_gateway``)
    gateways: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: what the carriers reported of what was handed over: delivered, undelivered, unconfirmed (no final
    #: report by DISPATCH_DLR_DEADLINE) and awaiting (still ``sent``)
    delivery_reports: dict[str, int] = dataclasses.field(default_factory=dict)
    #: voice runs: calls placed, answered (``delivered``), confirmed (pressed 1), and why the rest failed
    calls: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The status as the CLI's ``--json`` prints it: times as ISO 8601 strings."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("fire_time", "as_of", "created_at", "finished_at", "last_progress"):
            out[key] = _iso(out[key])
        return out


def status(runtime: Runtime, run_id: str) -> RunStatus:
    store = runtime.store
    run = store.get_run(run_id)
    counts = store.counts(run_id)
    stalled, last_progress = stall(runtime, run_id, run.status)
    return RunStatus(
        run_id=run_id,
        campaign_id=run.campaign_id,
        title=run.title,
        status=run.status,
        channel=run.channel,
        gateway=run.gateway,
        fire_time=run.fire_time,
        as_of=_as_of_local(run),
        created_at=run.created_at,
        finished_at=run.finished_at,
        template=run.template_name,
        template_sha256=run.template_sha256,
        campaign_sha256=run.campaign_sha256,
        total=run.total,
        batches=run.batches,
        counts=counts,
        by_district=store.by_district(run_id),
        parts_sent=store.parts_sent(run_id),
        gateways=store.by_gateway(run_id),
        open=sum(counts.get(s, 0) for s in ("pending", "sending", UNKNOWN)),
        failed=counts.get(FAILED, 0),
        halted=run.halted,
        # what the carriers said about what was handed over: ``awaiting`` rows are still ``sent``
        delivery_reports={
            "delivered": counts.get(DELIVERED, 0),
            "undelivered": counts.get(UNDELIVERED, 0),
            "unconfirmed": counts.get(UNCONFIRMED, 0),
            "awaiting": counts.get(SENT, 0),
        },
        stalled=stalled,
        last_progress=last_progress,
        calls=store.voice.call_outcomes(run_id) if run.channel == "voice" else {},
    )


def stall(runtime: Runtime, run_id: str, run_status: str) -> tuple[int, datetime | None]:
    """Rows of a running run that should be moving and are not (none moved for ``stall_after``),
    with when any row last moved; what ``status`` shows and the watchdog acts on."""
    if run_status != "running":
        return 0, None
    p = runtime.store.control.progress(run_id)
    last = p.last_progress
    quiet = last is None or (runtime.clock() - last).total_seconds() > runtime.settings.stall_after
    return ((p.due + p.sending) if quiet else 0), last


def _as_of_local(run: RunRecord) -> datetime | None:
    """The run's as-of date in its campaign's time zone, as the operator gave it (UTC in the database)."""
    if run.as_of is None:
        return None
    return run.as_of.astimezone(run_campaign(run).zone())


def pause_run(runtime: Runtime, run_id: str) -> dict[str, Any]:
    """Stop new sends of a run on every worker; its pending rows wait for ``resume``.

    Workers read the run's status before claiming a batch and every fraction of a second
    while sending one, so sends stop within about a second; rows a worker had claimed but
    not handed over go back to ``pending`` without counting an attempt.
    """
    store = runtime.store
    run = store.get_run(run_id)
    paused = store.control.pause_run(run_id)
    with structlog.contextvars.bound_contextvars(run_id=run_id, campaign_id=run.campaign_id):
        log.info("run.paused" if paused else "run.pause_ignored", was=run.status)
    return {"run_id": run_id, "paused": paused, "was": run.status}


def cancel_run(runtime: Runtime, run_id: str, actor: str = "operator") -> dict[str, Any]:
    """End every row still pending as ``cancelled``; rows a worker holds are cancelled by it.

    A message already handed to the gateway stays ``sent``: cancelling cannot unsend it.
    """
    store = runtime.store
    run = store.get_run(run_id)
    if run.status == "completed":
        return {"run_id": run_id, "cancelled": 0, "was": "completed"}
    n = store.cancel_open(run_id, actor=actor)
    with structlog.contextvars.bound_contextvars(run_id=run_id, campaign_id=run.campaign_id):
        log.info("run.cancelled", cancelled=n, was=run.status)
    return {"run_id": run_id, "cancelled": n, "was": run.status}
