"""The store seen through the providers' ``DeliveryReports`` port: what their webhooks may change.

Providers never import the store; the web app hands each provider's routes this
adapter, which calls the store's own operations (forward-only status, opt-out) and
renders a ringback campaign's warning from its newest run's snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from .. import metrics
from ..batch import RUNS, context_from_run
from ..channels import voice_script
from ..ringback import ENROL_CHANNEL, announcement_text

if TYPE_CHECKING:
    from ..runtime import Runtime

log = structlog.get_logger("dispatcher.web.delivery_reports")


class StoreDeliveryReports:
    """``providers.base.DeliveryReports`` over the runtime's store."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def apply_status(self, provider_id: str, status: str, *, error_code: str | None, actor: str) -> int:
        changes = self.runtime.store.provider_events.apply_status(
            provider_id, status, error_code=error_code, actor=actor
        )
        metrics.reports_applied(changes)
        return len(changes)

    def set_opted_out(self, phone: str, opted_out: bool) -> bool:
        return self.runtime.store.set_opted_out(phone, opted_out)

    def voice_script(self, delivery_id: int) -> str | None:
        """What the call of a voice delivery says, rendered from its run's snapshot for that recipient."""
        target = self.runtime.store.voice.call_target(delivery_id)
        if target is None:
            return None
        context = RUNS.get(self.runtime, target.run_id)
        recipient = {"name": target.name, "district": target.district, "grid": target.grid}
        return voice_script(context.composer, recipient)

    def key_press(self, delivery_id: int | None, digits: str, *, call_sid: str | None, actor: str) -> str:
        return self.runtime.store.voice.key_press(delivery_id, digits, call_sid=call_sid, actor=actor)

    def ringback_text(self, campaign_id: str) -> str | None:
        """The warning text of the newest ringback run of the campaign (its snapshot), without the SMS opt-out."""
        for run in self.runtime.store.list_runs(limit=20, campaign_id=campaign_id):
            if run.channel != ENROL_CHANNEL:
                continue
            try:
                return announcement_text(context_from_run(run))
            except Exception:  # a snapshot that no longer renders must not silence the warning
                log.exception("twiml.render_failed", campaign_id=campaign_id)
                break
        return None
