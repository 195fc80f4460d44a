"""SMS length arithmetic: which encoding a text needs, and the parts it is split into and billed as.

GSM-7 carries 160 characters in one part and 153 per part once split (the rest is
the concatenation header); characters of the GSM extension table (``{}[]~^|€\\``
and the form feed) take two septets, an escape and the character, and handsets and
providers never split such a pair across two parts. Anything outside GSM-7 -- every
Chinese message -- goes as UCS-2: 70 UTF-16 code units in one part, 67 per part when
split, and a character outside the Basic Multilingual Plane (an emoji, rare CJK)
takes two code units, a surrogate pair that is never split either. So a part may
end a unit short of the limit: 67 emoji are 3 parts (33 + 33 + 1), not 2.

``split_parts`` returns the parts exactly as they go out; ``segment`` counts them,
so the count and the boundaries a preview shows can never disagree. Chinese carriers
bill what we compute here: signature, brackets and opt-out text included.
"""

from __future__ import annotations

from dataclasses import dataclass

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

#: (units in a single part, units per part of a split message) per encoding
LIMITS = {"GSM-7": (160, 153), "UCS-2": (70, 67)}

#: the longest message an operator may define: carriers refuse longer concatenations
MAX_MESSAGE_CHARS = 500


@dataclass(slots=True)  # per recipient: not frozen (see providers.base.OutgoingMessage)
class Segmentation:
    encoding: str  # "GSM-7" or "UCS-2"
    #: units counted against the limits: septets for GSM-7, UTF-16 code units for UCS-2
    units: int
    parts: int
    #: characters as a person (and a Chinese carrier) counts them
    chars: int


_GSM7_ALL = GSM7_BASIC | GSM7_EXTENSION


def encoding_of(text: str) -> str:
    return "GSM-7" if _GSM7_ALL.issuperset(text) else "UCS-2"


def unit_cost(char: str, encoding: str) -> int:
    """Units one character takes: an escape pair (GSM-7) or a surrogate pair (UCS-2) is 2, never split."""
    if encoding == "GSM-7":
        return 2 if char in GSM7_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


def units_of(text: str, encoding: str | None = None) -> int:
    encoding = encoding or encoding_of(text)
    if encoding == "GSM-7":
        return len(text) + sum(text.count(c) for c in GSM7_EXTENSION)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _split(text: str, encoding: str, units: int) -> list[str]:
    single, multi = LIMITS[encoding]
    if units <= single:
        return [text]
    if units == len(text):  # every character one unit: plain slices (most Chinese text)
        return [text[i : i + multi] for i in range(0, len(text), multi)]
    parts: list[str] = []
    start = used = 0
    for index, char in enumerate(text):
        cost = unit_cost(char, encoding)
        if used + cost > multi:
            parts.append(text[start:index])
            start, used = index, 0
        used += cost
    parts.append(text[start:])
    return parts


def split_parts(text: str) -> list[str]:
    """The parts ``text`` goes out as, in order; ``"".join(parts) == text``.

    A character's units (one, or an indivisible pair) always land in one part, so a
    part is filled up to the per-part limit and ends one unit early when the next
    character is a pair that would straddle the boundary.
    """
    encoding = encoding_of(text)
    return _split(text, encoding, units_of(text, encoding))


def segment(text: str) -> Segmentation:
    encoding = encoding_of(text)
    units = units_of(text, encoding)
    chars = len(text)
    if units == chars:
        # every character one unit (all Chinese text): the parts are whole slices, counted without
        # cutting them (a worker segments every recipient's text; cutting took two fifths of the time)
        single, multi = LIMITS[encoding]
        return Segmentation(encoding, units, 1 if units <= single else -(-units // multi), chars)
    return Segmentation(encoding, units, len(_split(text, encoding, units)), chars)


def part_lines(text: str) -> list[str]:
    """One line per part, numbered and with its size, for an operator to see where each part ends."""
    encoding = encoding_of(text)
    parts = split_parts(text)
    unit = "septets" if encoding == "GSM-7" else "UTF-16 units"
    return [f"[{n}/{len(parts)}, {units_of(p, encoding)} {unit}] {p}" for n, p in enumerate(parts, 1)]
