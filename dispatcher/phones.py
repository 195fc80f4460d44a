"""Phone numbers: parse to E.164 with ``phonenumbers``, and mask for logs.

Residents are Chinese mobile subscribers; a number without a country code is read
as Chinese (region CN). Only mobile numbers can receive SMS, so fixed lines are
refused at import rather than failing at every send.
"""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

_MOBILE_TYPES = {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}
# an E.164 number or a bare Chinese mobile (11 digits starting with 1), anywhere in a string. The leading
# lookahead asks nothing the rest does not; it lets re skip to a '+' or a '1' instead of trying the pattern
# at every character (every HTTP trace is masked where it is stored: a third less time on one)
_NUMBER_RE = re.compile(r"(?=[+1])(?<![\w+])(\+\d{8,15}|1[3-9]\d{9})(?!\d)")


class InvalidPhone(ValueError):
    """The text is not a mobile number that can receive SMS."""


def normalise(raw: str, region: str = "CN") -> str:
    """Return the E.164 form of ``raw`` or raise ``InvalidPhone`` with a reason an operator understands."""
    text = raw.strip()
    if not text:
        raise InvalidPhone("phone number is empty")
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        raise InvalidPhone(f"cannot parse phone number {mask(text)!r}") from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhone(f"not a valid phone number: {mask(text)}")
    if phonenumbers.number_type(number) not in _MOBILE_TYPES:
        raise InvalidPhone(f"not a mobile number: {mask(text)}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def mask(number: str) -> str:
    """``+8613800000000`` -> ``**********0000``: the last four digits, enough to tell numbers apart.

    Only the last four digits are shown: with more (the old ``+86138****0000``) the
    hidden part is small enough to enumerate. No ``+`` is kept, so a masked number
    never starts a spreadsheet formula either.
    """
    digits = number.strip()
    if len(digits) < 8:
        return "*" * len(digits)
    return "*" * (len(digits) - 4) + digits[-4:]


def mask_text(text: str) -> str:
    """Mask every phone number found in free text (log lines, error messages, HTTP traces)."""
    return _NUMBER_RE.sub(lambda m: mask(m.group(0)), text)
