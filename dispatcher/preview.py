"""What a campaign would do, computed without writing or sending anything (``dispatch preview``).

Who is selected (by district, group and grid, opted-out people counted apart), every
template variant rendered for a sample resident with its encoding and parts, the theme
a run would use now, and the parts a run would send now with what they would cost, per district.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .campaigns import LoadedCampaign
from .channels import VOICE, voice_script
from .costs import cny
from .runs import audience_filter, run_price
from .sms import split_parts
from .templates import SAMPLE_RECIPIENT

if TYPE_CHECKING:
    from .runtime import Runtime


@dataclass(frozen=True)
class Variant:
    """One template rendered for the sample resident."""

    template: str
    text: str
    encoding: str
    chars: int
    parts: int
    part_texts: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "text": self.text,
            "encoding": self.encoding,
            "chars": self.chars,
            "parts": self.parts,
            "part_texts": self.part_texts,
        }


@dataclass(frozen=True)
class Preview:
    campaign_id: str
    title: str
    #: residents a run would message now (opted-out excluded)
    recipients: int
    opted_out: int
    #: district id -> {"selected", "opted_out", ...} as the store counts them
    by_district: dict[str, Any]
    by_district_segment: dict[str, dict[str, int]]
    by_district_grid: dict[str, dict[str, int]]
    variants: list[Variant]
    #: the template a run would use now
    template_now: str
    #: SMS parts a run would send now; for a voice campaign, calls it would place
    total_parts: int
    #: district id -> parts a run would send there now
    parts_by_district: dict[str, int]
    #: CNY per part the estimate uses (the dearest provider the campaign may send through)
    price_per_part: float
    budget: float | None = None
    channel: str = "sms"

    @property
    def cost(self) -> float:
        return cny(self.total_parts * self.price_per_part)

    def district_costs(self) -> dict[str, float]:
        return {d: cny(n * self.price_per_part) for d, n in self.parts_by_district.items()}

    def district_totals(self) -> dict[str, int]:
        """Residents per district a run would message (selected minus opted out)."""
        return {d: v["selected"] - v["opted_out"] for d, v in self.by_district.items()}

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "campaign_id": self.campaign_id,
            "recipients": self.recipients,
            "opted_out": self.opted_out,
            "by_district": self.by_district,
            "by_district_segment": self.by_district_segment,
            "by_district_grid": self.by_district_grid,
            "variants": [v.as_dict() for v in self.variants],
            "template_now": self.template_now,
            "total_parts": self.total_parts,
            "channel": self.channel,
            "parts_by_district": self.parts_by_district,
            "price_per_part": self.price_per_part,
            "cost_cny": self.cost,
            "cost_by_district": self.district_costs(),
            "budget_cny": self.budget,
        }


def preview(runtime: Runtime, loaded: LoadedCampaign) -> Preview:
    """Count the audience and render every variant; the total parts use the template of now."""
    audience = audience_filter(loaded)
    matrix = runtime.store.audience_matrix(audience)
    voice = loaded.campaign.channel == VOICE
    variants = []
    for name in loaded.template_names():
        if voice:
            # what a call says (twice, then asks for 1): one "part" per call, no SMS signature or opt-out
            said = voice_script(loaded.composer_for(name), SAMPLE_RECIPIENT)
            variants.append(Variant(name, said, "voice", len(said), 1, [said]))
            continue
        text, seg = loaded.composer_for(name).render(SAMPLE_RECIPIENT)
        variants.append(Variant(name, text, seg.encoding, seg.chars, seg.parts, split_parts(text)))
    current = loaded.template_now_or_next(runtime.clock())
    composer = loaded.composer_for(current)
    total_parts = recipients = 0
    parts_by_district: dict[str, int] = {}
    for row in runtime.store.iter_audience(audience):
        if row.opted_out:
            continue
        recipients += 1
        recipient = {"name": row.name, "district": row.district, "grid": row.grid}
        parts = 1 if voice else composer.render(recipient)[1].parts  # a call is one "part"
        total_parts += parts
        parts_by_district[row.district] = parts_by_district.get(row.district, 0) + parts
    return Preview(
        campaign_id=loaded.campaign.id,
        title=loaded.campaign.title,
        recipients=recipients,
        opted_out=sum(v["opted_out"] for v in matrix["by_district"].values()),
        by_district=matrix["by_district"],
        by_district_segment=matrix["by_district_segment"],
        by_district_grid=matrix["by_district_grid"],
        variants=variants,
        template_now=current,
        total_parts=total_parts,
        channel=loaded.campaign.channel,
        parts_by_district=parts_by_district,
        price_per_part=run_price(runtime, loaded),
        budget=loaded.campaign.budget,
    )
