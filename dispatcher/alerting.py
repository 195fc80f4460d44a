"""Early warning and emergency dissuasion (预警劝阻): reach one resident now, escalate until confirmed.

An alert (``dispatch alert send``, ``POST /api/alerts``) is written with its escalation steps, taken
from the policy (``alerting.yaml``): by default an SMS and a call at once, the call again after 2
and 5 minutes, and after 10 minutes the grid's workers and the police grid's duty number told by
SMS. Each step is a run of the ordinary pipeline over a list of numbers (claims, ledger, retries,
delivery reports), on the urgent lane at any hour. Steps due now are fired by the command that
takes the alert, later ones by the scheduler's leader (``tick``); each fires with a conditional
UPDATE in the transaction that creates its run, so never twice and never lost. A key press on a
call (``delivery.confirmed``) cancels the steps left. Every step and what its runs did is an event
of the alert's own hash chain.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import secrets
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import domain, safeyaml
from .campaigns import Campaign, parse_duration
from .errors import CampaignError, InputError, UsageError
from .phones import InvalidPhone, mask, normalise
from .redact import scrub
from .reports import parse_period
from .store import AlertRecord, AlertStep, DirectRecipient, NewAlert, RosterEntry, RunSpec
from .templates import TemplateSource

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.alerting")

#: the programme's fraud types (the quarterly themes' subjects): id -> name
FRAUD_TYPES: dict[str, str] = {
    "brushing": "刷单返利",
    "impersonating_police": "冒充公检法",
    "investment": "虚假投资理财",
    "loan": "贷款诈骗",
    "refund": "冒充客服退款",
    "romance": "网络交友诱导",
    "gaming": "网络游戏虚假交易",
    "other": "其他电信网络诈骗",
}
OUTCOMES = ("reached", "dissuaded", "stop_payment_requested", "unreachable")
ACTIONS = ("sms", "call", "notify_grid")
ROSTER_ROLES = ("grid_worker", "police_duty")
POLICY_FILE = "alerting.yaml"
OWNER = "公安分局"

#: what applies when the project has no alerting.yaml (the repository ships the same file)
DEFAULT_POLICY_TEXT = """\
# Early-warning escalation: what is done for an alert, and when (after the alert is taken).
# A key press (1) on a call cancels every step still to come.
steps:
  - {after: 0s, action: sms}
  - {after: 0s, action: call}
  - {after: 2m, action: call}
  - {after: 5m, action: call}
  - {after: 10m, action: notify_grid}
hotline: "96110"
signature: 【常州经开区反诈中心】
"""

#: the message texts when the project's templates/alerts/ lacks them
DEFAULT_TEMPLATES = {
    "alerts/warning.sms.j2": (
        "紧急提醒：您可能正在遭遇诈骗（{{ fraud_name }}）！请立即停止转账、挂断对方电话，不要透露验证码。"
        "民警将与您联系，咨询请拨{{ hotline }}。预警编号{{ alert_id }}"
    ),
    # the call names the sender and asks for the key press itself (channels.voice_script, the TwiML)
    "alerts/call.voice.j2": (
        "您可能正在遭遇诈骗，类型是{{ fraud_name }}。请立即停止转账，挂断对方电话，不要向任何人透露验证码。"
    ),
    "alerts/escalation.sms.j2": (
        "预警劝阻：网格{{ grid }}居民（尾号{{ resident_last4 }}）疑似遭遇诈骗（{{ fraud_name }}），"
        "电话与短信{{ waited }}分钟内未获确认，请立即上门劝阻。预警编号{{ alert_id }}"
    ),
}
TEMPLATE_FOR = {
    "sms": "alerts/warning.sms.j2",
    "call": "alerts/call.voice.j2",
    "notify_grid": "alerts/escalation.sms.j2",
}


# ------------------------------------------------------------------ policy


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyStep(_Model):
    after: str = Field(description="how long after the alert, e.g. 0s, 2m, 10m")
    action: Literal["sms", "call", "notify_grid"] = Field(description="sms, call or notify_grid")

    @field_validator("after")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    def delay(self) -> timedelta:
        return parse_duration(self.after)


class Policy(_Model):
    steps: list[PolicyStep] = Field(min_length=1)
    hotline: str = "96110"
    signature: str = "【常州经开区反诈中心】"

    @field_validator("signature")
    @classmethod
    def _signature(cls, value: str) -> str:
        if not (value.startswith("【") and value.endswith("】") and len(value) > 2):
            raise ValueError("a signature is written 【name】 and leads every message")
        return value


def parse_policy(text: str, name: str) -> Policy:
    """The policy in ``text``; any problem is one ``name:line: field: reason`` error (exit 2)."""
    node, data = safeyaml.load_or_fail(text, name, CampaignError)
    if not isinstance(data, dict) or node is None:
        raise CampaignError("the policy is a mapping with steps", path=name, line=1)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        elif first["type"] == "missing":
            message = "required field is missing"
        raise CampaignError(message, path=name, line=_line_of(node, loc), field=".".join(str(p) for p in loc)) from exc


def _line_of(node: yaml.Node, loc: tuple[Any, ...]) -> int:
    """The line of the deepest node of ``loc`` present in the document."""
    line = node.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
            if child is None:
                key = next((k for k, _ in node.value if k.value == part), None)
                return key.start_mark.line + 1 if key is not None else line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            return line
        node, line = child, child.start_mark.line + 1
    return line


def load_policy(runtime: Runtime) -> tuple[Policy, str, str]:
    """The project's ``alerting.yaml`` (else the embedded default): the policy, its text and its name."""
    path = runtime.settings.project_root / POLICY_FILE
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CampaignError(f"cannot read: {exc}", path=str(path)) from exc
        return parse_policy(text, str(path)), text, str(path)
    return parse_policy(DEFAULT_POLICY_TEXT, "<embedded alerting.yaml>"), DEFAULT_POLICY_TEXT, "<embedded>"


def template(runtime: Runtime, name: str) -> TemplateSource:
    path = runtime.settings.templates_dir / name
    if path.is_file():
        return TemplateSource(name=name, text=path.read_text(encoding="utf-8"))
    return TemplateSource(name=name, text=DEFAULT_TEMPLATES[name])


# ------------------------------------------------------------------ intake


def fraud_type(value: str) -> str:
    """The fraud type's id from its id or its Chinese name; an unknown one is a one-line error."""
    text = value.strip()
    for key, name in FRAUD_TYPES.items():
        if text in (key, name):
            return key
    raise UsageError(f"unknown fraud type {text!r} (known: {', '.join(FRAUD_TYPES)})", field="type")


def new_alert_id(now: datetime) -> str:
    return f"A{now:%Y%m%d%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class AlertRequest:
    phone: str
    fraud_type: str
    name: str = ""
    source: str | None = None
    external_id: str | None = None
    actor: str = "operator"


def check_request(req: AlertRequest) -> AlertRequest:
    """Normalise and check an alert before anything is written: number, fraud type, lengths."""
    try:
        phone = normalise(req.phone)
    except InvalidPhone as exc:
        raise UsageError(str(exc), field="phone") from exc
    if req.external_id is not None and not (1 <= len(req.external_id.strip()) <= 128):
        raise UsageError("the external id is 1-128 characters", field="id")
    if len(req.name) > 64:
        raise UsageError("the name is at most 64 characters", field="name")
    if req.source is not None and len(req.source) > 500:
        raise UsageError("the source is at most 500 characters", field="source")
    return AlertRequest(
        phone=phone,
        fraud_type=fraud_type(req.fraud_type),
        name=req.name.strip(),
        source=mask_numbers(req.source),
        external_id=req.external_id.strip() if req.external_id else None,
        actor=req.actor,
    )


@dataclass(frozen=True)
class Taken:
    alert: AlertRecord
    created: bool
    #: the runs of the steps fired at once by this request (enqueued on the urgent lane)
    fired: list[str]


def send_alert(runtime: Runtime, req: AlertRequest) -> Taken:
    """Take an alert: write it with its steps (nothing new for an external id seen before), fire what is due."""
    req = check_request(req)
    policy, _text, _name = load_policy(runtime)
    store = runtime.store
    now = runtime.clock()
    resident = store.resident_by_phone(req.phone)
    alert = NewAlert(
        id=new_alert_id(now),
        external_id=req.external_id,
        phone=req.phone,
        name=req.name or (resident.name if resident else ""),
        fraud_type=req.fraud_type,
        source=req.source,
        district=resident.district if resident else "",
        grid=resident.grid if resident else "",
        actor=req.actor,
    )
    steps = [(s.action, now + s.delay()) for s in policy.steps]
    record, created = store.alerts.create(alert, steps)
    with structlog.contextvars.bound_contextvars(alert_id=record.id):
        if not created:
            log.info("alert.repeated", external_id=req.external_id)
            return Taken(record, False, [])
        log.info("alert.created", phone=mask(record.phone), fraud_type=record.fraud_type, district=record.district)
        fired = fire_due(runtime, actor=req.actor, alert_id=record.id)
    return Taken(record, True, fired)


# ------------------------------------------------------------------ firing


def _campaign_yaml(policy: Policy, alert: AlertRecord, step: AlertStep, channel: str, tmpl: TemplateSource) -> str:
    """The snapshot an alert step's run carries: an urgent campaign of one alert (workers render from it)."""
    data = {
        "id": f"alert-{alert.fraud_type.replace('_', '-')}",
        "title": f"预警劝阻 {FRAUD_TYPES[alert.fraud_type]} {alert.id}",
        "owner": OWNER,
        "channel": channel,
        "template": tmpl.name,
        "variables": {
            "alert_id": alert.id,
            "fraud_name": FRAUD_TYPES[alert.fraud_type],
            "hotline": policy.hotline,
            "grid": alert.grid or "-",
            "resident_last4": alert.phone[-4:],
            "waited": int((step.due_at - alert.created_at).total_seconds() // 60),
        },
        "signature": policy.signature,
        # a warning to one person about a fraud in progress is not an awareness message: no opt-out line
        "opt_out_text": "",
        "priority": "urgent",
        "reason": alert.id,
    }
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _recipients(runtime: Runtime, alert: AlertRecord, step: AlertStep) -> tuple[list[DirectRecipient], str | None]:
    """Who the step messages, or why nobody (the step is then recorded as skipped)."""
    if step.action in ("sms", "call"):
        return [DirectRecipient(alert.phone, alert.district, alert.grid)], None
    if not alert.grid:
        return [], "the number is not in the registry: no grid to tell"
    roster = runtime.store.alerts.roster_for(alert.grid)
    if not roster:
        return [], f"no roster for grid {alert.grid} (dispatch roster import)"
    return [DirectRecipient(e.phone, alert.district, alert.grid) for e in roster], None


def _spec(runtime: Runtime, policy: Policy, alert: AlertRecord, step: AlertStep, actor: str) -> tuple[RunSpec, str]:
    from .runs import new_run_id

    channel = "voice" if step.action == "call" else "sms"
    tmpl = template(runtime, TEMPLATE_FOR[step.action])
    text = _campaign_yaml(policy, alert, step, channel, tmpl)
    Campaign.model_validate(yaml.safe_load(text))  # the worker parses the same snapshot
    settings = runtime.settings
    gateway = settings.voice_gateway if channel == "voice" else ",".join(settings.gateways)
    spec = RunSpec(
        run_id=new_run_id(runtime.clock()),
        campaign_id=f"alert-{alert.fraud_type.replace('_', '-')}",
        title=f"预警劝阻 {FRAUD_TYPES[alert.fraud_type]} {alert.id}",
        owner="police",
        channel=channel,
        priority="urgent",
        reason=alert.id,
        gateway=gateway[:32],
        campaign_path=POLICY_FILE,
        campaign_yaml=text,
        campaign_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        template_name=tmpl.name,
        template_text=tmpl.text,
        template_sha256=tmpl.sha256,
        send_by=None,
        batch_size=settings.batch_size,
        signature=policy.signature,
        opt_out_text="",
        actor=actor,
        # an alert is urgent by nature and its policy file is no campaign version: exempt, as urgent sends are
        approval_exempt=f"urgent: alert {alert.id}",
    )
    return spec, channel


def fire_due(runtime: Runtime, *, actor: str, alert_id: str | None = None, limit: int = 100) -> list[str]:
    """Fire every step due now (of one alert, or of all); each is taken atomically. Returns the runs started."""
    from .runs import enqueue_batches

    store = runtime.store
    steps = store.alerts.due_steps(runtime.clock(), limit, alert_id)
    if not steps:
        return []
    policy, _text, _name = load_policy(runtime)
    fired: list[str] = []
    alerts: dict[str, AlertRecord] = {}
    for step in steps:
        alert = alerts.get(step.alert_id) or store.alerts.get(step.alert_id)
        alerts[alert.id] = alert
        with structlog.contextvars.bound_contextvars(alert_id=alert.id, step=step.seq, action=step.action):
            recipients, why_not = _recipients(runtime, alert, step)
            spec: RunSpec | None = None
            if not why_not:
                try:
                    spec, _channel = _spec(runtime, policy, alert, step, actor)
                except ValidationError as exc:
                    # a snapshot the campaign model refuses cannot be sent: the step is skipped, on record
                    why_not = f"cannot {step.action}: {exc.errors()[0]['msg']}"
            if not store.alerts.fire_step(step, actor=actor, spec=spec, recipients=recipients, detail=why_not):
                continue  # another process fired or cancelled it
            if spec is None:
                log.warning("alert.step_skipped", why=why_not)
                continue
            enqueue_batches(runtime, spec.run_id, [0], "urgent")
            log.info("alert.step_fired", run_id=spec.run_id, recipients=len(recipients))
            fired.append(spec.run_id)
    return fired


def tick(runtime: Runtime, *, actor: str) -> dict[str, Any]:
    """The scheduler leader's pass: record what the alerts' runs did (a key press cancels what is left),
    then fire the steps now due."""
    confirmed = runtime.store.alerts.observe(actor)
    for alert_id in confirmed:
        log.info("alert.confirmed", alert_id=alert_id)
    fired = fire_due(runtime, actor=actor)
    return {"confirmed": confirmed, "fired": fired}


# ------------------------------------------------------------------ closing and reading


def close_alert(runtime: Runtime, alert_id: str, outcome: str, note: str | None, actor: str) -> AlertRecord:
    if outcome not in OUTCOMES:
        raise UsageError(f"unknown outcome {outcome!r} (known: {', '.join(OUTCOMES)})", field="outcome")
    if note is not None and len(note) > 1000:
        raise UsageError("the note is at most 1000 characters", field="note")
    # what the runs did until now goes into the chain before the close does
    runtime.store.alerts.observe(actor)
    record = runtime.store.alerts.close(alert_id, outcome=outcome, note=mask_numbers(note), actor=actor)
    log.info("alert.closed", alert_id=alert_id, outcome=outcome)
    return record


#: any run of 7 or more digits: a note is written in Chinese, where a number follows a character without a gap
_DIGITS_RE = re.compile(r"\+?\d{7,}")


def mask_numbers(text: str | None) -> str | None:
    """Mask every long digit run of free text (a case note), even one glued to Chinese characters."""
    return None if text is None else _DIGITS_RE.sub(lambda m: mask(m.group(0)), text)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def alert_json(alert: AlertRecord, *, unmasked: bool = False) -> dict[str, Any]:
    """An alert for output: the number masked (an operator asks for it explicitly elsewhere)."""
    return {
        "id": alert.id,
        "external_id": alert.external_id,
        "phone": alert.phone if unmasked else mask(alert.phone),
        "fraud_type": alert.fraud_type,
        "fraud_name": FRAUD_TYPES.get(alert.fraud_type, alert.fraud_type),
        "district": alert.district,
        "grid": alert.grid,
        "status": alert.status,
        "outcome": alert.outcome,
        "note": scrub(alert.note) if alert.note else None,
        "created_at": _iso(alert.created_at),
        "first_contact_at": _iso(alert.first_contact_at),
        "confirmed_at": _iso(alert.confirmed_at),
        "closed_at": _iso(alert.closed_at),
    }


def alert_status(runtime: Runtime, alert_id: str) -> dict[str, Any]:
    store = runtime.store
    alert = store.alerts.get(alert_id)
    steps = []
    for s in store.alerts.steps(alert_id):
        rows = []
        if s.run_id:
            rows = [
                {"phone": mask(r.phone), "state": r.state, "error_code": r.error_code, "attempts": r.attempts}
                for r in store.deliveries(s.run_id)
            ]
        steps.append(
            {
                "seq": s.seq,
                "action": s.action,
                "due_at": _iso(s.due_at),
                "state": s.state,
                "run_id": s.run_id,
                "fired_at": _iso(s.fired_at),
                "fired_by": s.fired_by,
                "detail": s.detail,
                "deliveries": rows,
            }
        )
    milestones = [{"name": m.name, "at": _iso(m.at)} for m in store.alerts.milestones(alert_id)]
    return {**alert_json(alert), "steps": steps, "milestones": milestones}


# ------------------------------------------------------------------ report


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 1)


def report(runtime: Runtime, period_text: str) -> dict[str, Any]:
    """Alerts of a period by district, fraud type and outcome; seconds to first contact and to confirmation."""
    period = parse_period(period_text)
    alerts = runtime.store.alerts.created_between(period.start, period.end)
    contact = [(a.first_contact_at - a.created_at).total_seconds() for a in alerts if a.first_contact_at]
    confirm = [(a.confirmed_at - a.created_at).total_seconds() for a in alerts if a.confirmed_at]
    return {
        "period": period.label,
        "alerts": len(alerts),
        "open": sum(1 for a in alerts if a.status == "open"),
        "by_district": dict(sorted(Counter(a.district or "unknown" for a in alerts).items())),
        "by_fraud_type": dict(sorted(Counter(a.fraud_type for a in alerts).items())),
        "by_outcome": dict(sorted(Counter(a.outcome or "open" for a in alerts).items())),
        "reached": len(contact),
        "confirmed": len(confirm),
        "first_contact_seconds": {"p50": _percentile(contact, 50), "p95": _percentile(contact, 95)},
        "confirmation_seconds": {"p50": _percentile(confirm, 50), "p95": _percentile(confirm, 95)},
    }


# ------------------------------------------------------------------ roster and API keys


@dataclass(frozen=True)
class RosterImport:
    imported: int
    errors: list[InputError]


def parse_roster(path: Path) -> Iterator[RosterEntry | InputError]:
    """Each row of a roster CSV (grid, role, name, phone) as an entry, or as its ``file:line: field: reason``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise UsageError("file not found", path=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read: {exc}", path=str(path)) from exc
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("grid", "role", "name", "phone") if c not in (reader.fieldnames or [])]
    if missing:
        raise UsageError(f"missing column(s) {', '.join(missing)}", path=str(path), line=1, field="header")
    for row in reader:
        line = reader.line_num

        def bad(field: str, reason: str, line: int = line) -> InputError:
            return UsageError(reason, path=str(path), line=line, field=field)

        grid = (row.get("grid") or "").strip()
        role = (row.get("role") or "").strip()
        name = (row.get("name") or "").strip()
        if not grid or len(grid) > 16:
            yield bad("grid", "a grid code of 1-16 characters is required")
            continue
        if domain.district_of_grid(grid) is None:
            yield bad("grid", f"grid {grid!r} belongs to no known district")
            continue
        if role not in ROSTER_ROLES:
            yield bad("role", f"unknown role {role!r} (known: {', '.join(ROSTER_ROLES)})")
            continue
        if len(name) > 64:
            yield bad("name", "at most 64 characters")
            continue
        try:
            phone = normalise(row.get("phone") or "")
        except InvalidPhone as exc:
            yield bad("phone", str(exc))
            continue
        yield RosterEntry(grid=grid, role=role, name=name, phone=phone)


def import_roster(runtime: Runtime, path: Path) -> RosterImport:
    """Keep the good rows, report every bad one (the caller exits 2 if there were any)."""
    good: list[RosterEntry] = []
    errors: list[InputError] = []
    for item in parse_roster(path):
        if isinstance(item, InputError):
            errors.append(item)
        else:
            good.append(item)
    return RosterImport(runtime.store.alerts.roster_upsert(good), errors)


def new_api_key(runtime: Runtime, name: str) -> str:
    """A fresh key for ``POST /api/alerts``: returned once, only its sha256 is kept."""
    if not (1 <= len(name) <= 64) or not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError("a key name is 1-64 letters, digits, '-' or '_'", field="name")
    key = "dak_" + secrets.token_urlsafe(32)
    runtime.store.alerts.add_key(name, key)
    return key
