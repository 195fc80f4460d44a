"""Two-person approval of campaign versions, and the gate that keeps unapproved versions off real gateways.

A campaign's **version** is a sha256 over its file and every template it uses (the
``template``, or every ``themes`` template): editing any of them makes a new version.
Templates cannot include other files (the sandbox has no loader), so these are all the
files a message can be made of.

One operator **submits** the current version (``dispatch submit``), a second one
**approves** it (``dispatch approve``); the author approving their own version is refused,
and the refusal is on record. Identities are the dashboard's operator accounts: the
command line proves them with the account's password (``cli/approvals.py``), the web
app with its session; this module takes the proven name.

The **gate** (``gate``, called by ``runs.start_run`` for every run, manual or scheduled)
lets a run through a real gateway only if the campaign's current version is approved.
Drills on the outbox gateway and urgent sends are exempt, and the run records why. The
first time a new version is seen (listing, submitting, approving, running, firing), a
live approval of an older version is voided, with its event in the ledger's audit chain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from .batch import DRILL_GATEWAY, channel_adapter, is_drill, run_campaign
from .campaigns import LoadedCampaign
from .errors import UsageError
from .store import ApprovalRow, ApprovalState, RunRecord

if TYPE_CHECKING:
    from .runtime import Runtime

class NotApproved(UsageError):
    """A run through a real gateway of a campaign version no second operator has approved."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="approval")


def campaign_version(loaded: LoadedCampaign) -> str:
    """sha256 over the campaign file's text and the name and text of every template it uses."""
    manifest = {
        "campaign": hashlib.sha256(loaded.located.text.encode("utf-8")).hexdigest(),
        "templates": {name: source.sha256 for name, source in sorted(loaded.templates.items())},
    }
    blob = json.dumps(manifest, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def short(version: str) -> str:
    return version[:12]


@dataclass(frozen=True)
class Gate:
    """What a run records of its approval: the version, who approved it and when, or why none was needed."""

    version: str
    approved_by: str | None = None
    approved_at: datetime | None = None
    exempt: str | None = None


def exemption(runtime: Runtime, loaded: LoadedCampaign) -> str | None:
    """Why a run of this campaign needs no approval (None: it does).

    Urgent sends go out at once with their stated reason; a drill's messages only reach
    the outbox file. The gateway asked is the one that would send (the adapter built for
    the campaign's ``gateways:`` or DISPATCH_GATEWAY / DISPATCH_RINGBACK_GATEWAY).
    """
    c = loaded.campaign
    if c.priority == "urgent":
        return f"urgent: {c.reason}"
    return _drill(runtime, c.channel, c.gateways)


def _drill(runtime: Runtime, channel: str, gateways: list[str]) -> str | None:
    return f"drill: {DRILL_GATEWAY} gateway" if is_drill(channel_adapter(runtime, channel, gateways)) else None


def describe(state: ApprovalState) -> str:
    """The state in words: unapproved, submitted by X, approved by Y at T, voided by edit."""
    row = state.current
    if row is not None and row.approved_by:
        return (
            f"approved by {row.approved_by} at {row.approved_at:%Y-%m-%d %H:%M} UTC (submitted by {row.submitted_by})"
        )
    if row is not None:
        return f"submitted by {row.submitted_by} at {row.submitted_at:%Y-%m-%d %H:%M} UTC, awaiting a second operator"
    if state.voided is not None:
        v = state.voided
        was = f"approved by {v.approved_by}" if v.approved_by else f"submitted by {v.submitted_by}"
        return f"voided by edit (version {short(v.version)} was {was}); unapproved"
    return "unapproved"


def state_name(state: ApprovalState) -> str:
    if state.current is not None:
        return "approved" if state.current.approved_by else "submitted"
    return "voided" if state.voided is not None else "unapproved"


def refusal(campaign_id: str, version: str, path: str, state: ApprovalState) -> str:
    """The one line a refused run prints: the campaign, the version's short sha, the command that approves it."""
    approve = f"`dispatch approve {path} --as NAME` (a second operator)"
    how = approve if state.current is not None else f"`dispatch submit {path} --as AUTHOR`, then {approve}"
    return (
        f"campaign {campaign_id}: version {short(version)} is not approved ({describe(state)}); approve it with {how}"
    )


def gate(runtime: Runtime, loaded: LoadedCampaign, *, actor: str) -> Gate:
    """The approval a run of ``loaded`` is made under; raises ``NotApproved`` (nothing written or sent).

    The store checks again, in the transaction that creates the run, that the approval is
    still live, so an edit voiding it in between cannot slip through.
    """
    version = campaign_version(loaded)
    exempt = exemption(runtime, loaded)
    if exempt is not None:
        return Gate(version, exempt=exempt)
    c = loaded.campaign
    state = runtime.store.approvals.observe(c.id, version, actor=actor)
    row = state.current
    if row is None or not row.approved_by:
        raise NotApproved(refusal(c.id, version, str(loaded.path), state))
    return Gate(version, approved_by=row.approved_by, approved_at=row.approved_at)


def check_resume(runtime: Runtime, run: RunRecord) -> None:
    """Refuse to resume, through a real gateway, a run that was made as a drill of an unapproved version.

    A run approved at creation, an urgent run and a run made before approvals existed resume
    as before; so does a drill resumed on the drill gateway.
    """
    if run.approved_by or run.version_sha256 is None or not run.approval_exempt:
        return
    if run.approval_exempt.startswith("urgent"):
        return
    if _drill(runtime, run.channel, run_campaign(run).gateways) is not None:
        return
    state = runtime.store.approvals.state(run.campaign_id, run.version_sha256)
    if state.current is not None and state.current.approved_by:
        return
    raise NotApproved(
        f"run {run.id} was made as a drill ({run.approval_exempt}) and this resume would send it through a real "
        f"gateway; {refusal(run.campaign_id, run.version_sha256, run.campaign_path, state)}"
    )


# ------------------------------------------------------------------ submit and approve


def current(runtime: Runtime, loaded: LoadedCampaign, *, actor: str) -> tuple[str, ApprovalState]:
    """The campaign's current version and its state (a live approval of an older version is voided)."""
    version = campaign_version(loaded)
    return version, runtime.store.approvals.observe(loaded.campaign.id, version, actor=actor)


def _expect(version: str, expected: str | None, campaign_id: str) -> None:
    if expected and not version.startswith(expected.strip().lower()):
        raise UsageError(
            f"campaign {campaign_id}: the current version is {short(version)}, not {expected}: "
            "the files changed since they were reviewed",
            field="version",
        )


def submit(
    runtime: Runtime, loaded: LoadedCampaign, *, by: str, expected: str | None = None
) -> tuple[str, ApprovalRow]:
    """Submit the campaign's current version as the proven operator ``by``; returns (outcome, row)."""
    version = campaign_version(loaded)
    _expect(version, expected, loaded.campaign.id)
    outcome, row = runtime.store.approvals.submit(loaded.campaign.id, version, str(loaded.path), by=by)
    return outcome, row


def approve(
    runtime: Runtime, loaded: LoadedCampaign, *, by: str, expected: str | None = None
) -> tuple[str, ApprovalRow]:
    """Approve the campaign's current version as the proven operator ``by``.

    Not submitted, or submitted by ``by`` (refused, and the refusal recorded): ``UsageError``.
    """
    c = loaded.campaign
    version = campaign_version(loaded)
    _expect(version, expected, c.id)
    outcome, row = runtime.store.approvals.approve(c.id, version, by=by)
    if outcome == "not_submitted":
        raise UsageError(
            f"campaign {c.id}: version {short(version)} has not been submitted; its author runs "
            f"`dispatch submit {loaded.path} --as AUTHOR` first",
            field="approval",
        )
    if outcome == "self_approval":
        raise UsageError(
            f"campaign {c.id}: {by} submitted version {short(version)} and cannot approve it; "
            "a second operator must (the refusal is recorded in the audit chain)",
            field="approval",
        )
    assert row is not None
    return outcome, row
