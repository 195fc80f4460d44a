"""One masking pass for free text: phone numbers masked, credentials replaced by ``[redacted]``.

Everything that can carry text someone else wrote — a provider's error message, an
exception, an HTTP trace, an operator's reason, a log line — goes through ``scrub``
before it is stored, logged or printed, so no call site has to know which of them
might quote a number or echo a request's ``Authorization`` header back.

Credentials are recognised by shape: Twilio account and API-key SIDs, the value of
an ``Authorization`` header (``Basic``/``Bearer``/``Digest``/``Token`` and the
base64 or token blob after it), and ``name=value`` / ``"name": "value"`` pairs whose
name says secret (token, password, api_key, ...). Exact known secret values (a
configured auth token) are replaced by the adapters' ``Redactor`` on top of this.
"""

from __future__ import annotations

import re

from .phones import mask_text

REDACTED = "[redacted]"

# Each pattern starts with a lookahead of the characters a match can start with: Python's re then skips
# to those instead of trying the whole pattern at every character (under IGNORECASE, a third to half the
# time on a Twilio exchange's trace). It asks nothing the pattern does not ask anyway.

#: Twilio account (AC) and API key (SK) SIDs: 2 letters + 32 hex digits. Message SIDs (SM/MM) are
#: provider ids auditors need, and are left alone.
_SID_RE = re.compile(r"(?=[AS])\b(?:AC|SK)[0-9a-fA-F]{32}\b")
#: an Authorization header's scheme and credentials, wherever the header is quoted
_AUTH_SCHEME_RE = re.compile(r"(?=[bdt])\b(Basic|Bearer|Digest|Token)\s+[A-Za-z0-9+/=._~\-]{6,}", re.IGNORECASE)
#: a header line: ``Authorization: Basic <blob>`` / ``X-Api-Key: <key>``: the scheme (if any) and one token
_HEADER_RE = re.compile(
    r"(?=[apx])\b(authorization|proxy-authorization|x-api-key)(\s*:\s*)(?:(?:basic|bearer|digest|token)\s+)?[^\s\"',;]+",
    re.IGNORECASE,
)
#: credentials quoted as name and value: a JSON member (``"token": "..."``) or a form/query pair
#: (``api_key=...``). A bare ``password: ...`` is left alone: that is how our own messages name a
#: field ("password: too short")
_NAMES = (
    r"authorization|proxy-authorization|x-api-key|api[_-]?key|apikey|auth[_-]?token|access[_-]?token"
    r"|token|secret|password|passwd"
)
_SECRET_PAIR_RE = re.compile(
    rf"""(?=["'apxts])(?P<name>(?:["'](?:{_NAMES})["']\s*:|\b(?:{_NAMES})\s*=))"""
    r"""(?P<sep>\s*)(?P<quote>["'])?(?P<value>(?(quote)[^"'\r\n]+|[^\s&,;"'}]+))""",
    re.IGNORECASE,
)


def _pair(match: re.Match[str]) -> str:
    quote = match.group("quote") or ""
    return f"{match.group('name')}{match.group('sep')}{quote}{REDACTED}"


#: words one of which is in every match of each pattern: a text without any is not searched with it.
#: Every HTTP trace is scrubbed where it is stored, and the scrub of a Twilio exchange was a sixth of a
#: sending worker's CPU
_HEADER_WORDS = ("authorization", "x-api-key")
_SCHEME_WORDS = ("basic", "bearer", "digest", "token")
_PAIR_WORDS = ("authorization", "api-key", "api_key", "apikey", "token", "secret", "passw")
#: the characters besides ASCII letters that IGNORECASE takes for one and ``lower()`` does not turn into
#: it (İ and ı for i, ſ for s; the Kelvin sign lowers to k): folded before the words are looked for, so a
#: word spelt with them is found as the patterns find it
_FOLDS = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s"})


def redact_credentials(text: str) -> str:
    """Replace credentials recognisable by their shape with ``[redacted]``."""
    folded = (text if text.isascii() else text.translate(_FOLDS)).lower()
    # a replacement brings in no word of another pattern, so the words are looked for once, in the text given
    if any(word in folded for word in _HEADER_WORDS):
        text = _HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    if any(word in folded for word in _SCHEME_WORDS):
        text = _AUTH_SCHEME_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if any(word in folded for word in _PAIR_WORDS):
        text = _SECRET_PAIR_RE.sub(_pair, text)
    if "AC" in text or "SK" in text:
        text = _SID_RE.sub(REDACTED, text)
    return text


def scrub(text: str) -> str:
    """Mask phone numbers and redact credentials in free text (the one pass every written text gets)."""
    if not text:
        return text
    return mask_text(redact_credentials(text))


def scrub_optional(text: str | None) -> str | None:
    return None if text is None else scrub(text)


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/vhost`` -> ``amqp://user:***@host/vhost``: a URL fit for an error message."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))
