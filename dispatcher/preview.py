"""What a campaign would do, computed without writing or sending anything (``dispatch preview``).

Who is selected (by district, group and grid, opted-out people counted apart), every
template variant rendered for a sample resident with its encoding and parts, the theme
a run would use now, and the parts a run would send now with what they would cost, per district.

And what personalising costs (``Personalising``): a text that starts with the resident's name
differs for everyone, so a carrier that takes one text for many numbers in one call (the HTTP
adapter's batch mode) makes a call per person, and a longer name can push a Chinese text over a
part boundary (UCS-2: 70 characters in one part, 67 a part once split). The preview counts the
calls and parts of the texts as personalised and of the same warning without the name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .campaigns import LoadedCampaign
from .channels import VOICE, voice_script
from .costs import cny
from .errors import DispatchError
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
class Personalising:
    """Calls and parts of a run's texts as personalised, and of the same warning without the name.

    ``calls`` counts one carrier call per text per batch of ``DISPATCH_BATCH_SIZE`` rows (the sender
    groups equal texts of a chunk into one call), at most ``per_call`` numbers a call; a gateway
    that takes one number a call (``per_call`` 1) makes a call per person either way.
    """

    texts: int
    distinct: int
    calls: int
    parts: int
    plain_distinct: int
    plain_calls: int
    plain_parts: int
    per_call: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "distinct_texts": self.distinct,
            "calls": self.calls,
            "parts": self.parts,
            "without_name": {
                "distinct_texts": self.plain_distinct,
                "calls": self.plain_calls,
                "parts": self.plain_parts,
            },
            "numbers_per_call": self.per_call,
        }

    def line(self) -> str:
        """``personalised: 4,935 texts in 4,916 calls, 9,870 parts; the same warning without the name: ...``"""
        return (
            f"personalised: {self.texts:,} texts in {self.calls:,} calls, {self.parts:,} parts; "
            f"the same warning without the name: {self.plain_calls:,} calls, {self.plain_parts:,} parts"
        )


class _Calls:
    """Counts carrier calls as the sender makes them: per batch of rows, one call per text (and per
    ``per_call`` numbers of it)."""

    def __init__(self, per_call: int, batch_size: int) -> None:
        self.per_call = per_call
        self.batch_size = batch_size
        self.calls = 0
        self.seen: set[str] = set()
        self._batch: dict[str, int] = {}
        self._rows = 0

    def add(self, text: str) -> None:
        self.seen.add(text)
        self._batch[text] = self._batch.get(text, 0) + 1
        self._rows += 1
        if self._rows == self.batch_size:
            self.flush()

    def flush(self) -> None:
        self.calls += sum(math.ceil(n / self.per_call) for n in self._batch.values())
        self._batch, self._rows = {}, 0


def numbers_per_call(runtime: Runtime, loaded: LoadedCampaign) -> int:
    """How many numbers one call of the campaign's gateways carries, from their configuration alone."""
    from .providers.registry import batch_capacity

    try:
        return batch_capacity(runtime.settings, loaded.campaign.gateways or runtime.settings.gateways)
    except DispatchError:
        return 1  # an adapter not configured in this shell: one call per message is the safe estimate


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
    #: what the name costs in calls and parts (SMS only)
    personalising: Personalising | None = None

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
            "personalising": self.personalising.as_dict() if self.personalising is not None else None,
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
    total_parts = recipients = plain_parts = 0
    parts_by_district: dict[str, int] = {}
    per_call = 1 if voice else numbers_per_call(runtime, loaded)
    named, plain = _Calls(per_call, runtime.settings.batch_size), _Calls(per_call, runtime.settings.batch_size)
    unnamed: dict[tuple[str, str], tuple[str, int]] = {}
    for row in runtime.store.iter_audience(audience):
        if row.opted_out:
            continue
        recipients += 1
        recipient = {"name": row.name, "district": row.district, "grid": row.grid}
        if voice:
            parts = 1  # a call is one "part"
        else:
            text, seg = composer.render(recipient)
            parts = seg.parts
            named.add(text)
            without = unnamed.get((row.district, row.grid))
            if without is None:
                without = unnamed[(row.district, row.grid)] = _plain(composer, recipient)
            plain.add(without[0])
            plain_parts += without[1]
        total_parts += parts
        parts_by_district[row.district] = parts_by_district.get(row.district, 0) + parts
    named.flush()
    plain.flush()
    personalising = (
        None
        if voice
        else Personalising(
            texts=recipients,
            distinct=len(named.seen),
            calls=named.calls,
            parts=total_parts,
            plain_distinct=len(plain.seen),
            plain_calls=plain.calls,
            plain_parts=plain_parts,
            per_call=per_call,
        )
    )
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
        personalising=personalising,
    )


def _plain(composer: Any, recipient: Mapping[str, Any]) -> tuple[str, int]:
    """The recipient's text without the name (district and grid kept), and its parts."""
    text, seg = composer.render({**recipient, "name": ""})
    return text, seg.parts
