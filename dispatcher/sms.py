"""SMS length arithmetic: which encoding a text needs and how many parts it is billed as.

GSM-7 carries 160 characters in one part and 153 per part once split (the rest is
the concatenation header); characters of the GSM extension table (``{}[]~^|€\\``)
take two septets. Anything outside GSM-7 -- every Chinese message -- goes as UCS-2:
70 characters in one part, 67 per part when split, and a character outside the
Basic Multilingual Plane (an emoji) takes two UTF-16 units. Chinese carriers bill
what we compute here: signature, brackets and opt-out text included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

#: the longest message an operator may define: carriers refuse longer concatenations
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class Segmentation:
    encoding: str  # "GSM-7" or "UCS-2"
    #: units counted against the limits: septets for GSM-7, UTF-16 code units for UCS-2
    units: int
    parts: int
    #: characters as a person (and a Chinese carrier) counts them
    chars: int


def segment(text: str) -> Segmentation:
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        units = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        single, multi, encoding = 160, 153, "GSM-7"
    else:
        units = sum(2 if ord(c) > 0xFFFF else 1 for c in text)
        single, multi, encoding = 70, 67, "UCS-2"
    parts = 1 if units <= single else math.ceil(units / multi)
    return Segmentation(encoding=encoding, units=units, parts=parts, chars=len(text))
