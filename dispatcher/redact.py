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
from collections.abc import Callable

from .phones import mask_text

REDACTED = "[redacted]"

#: Twilio account (AC) and API key (SK) SIDs: 2 letters + 32 hex digits. Message SIDs (SM/MM) are
#: provider ids auditors need, and are left alone. The leading lookahead asks nothing the rest does not;
#: it lets re skip to an A or an S instead of trying the pattern at every character
_SID_RE = re.compile(r"(?=[AS])\b(?:AC|SK)[0-9a-fA-F]{32}\b")
#: an Authorization header's scheme and credentials, wherever the header is quoted
_AUTH_SCHEME_RE = re.compile(r"\b(Basic|Bearer|Digest|Token)\s+[A-Za-z0-9+/=._~\-]{6,}", re.IGNORECASE)
#: a header line: ``Authorization: Basic <blob>`` / ``X-Api-Key: <key>``: the scheme (if any) and one token
_HEADER_RE = re.compile(
    r"\b(authorization|proxy-authorization|x-api-key)(\s*:\s*)(?:(?:basic|bearer|digest|token)\s+)?[^\s\"',;]+",
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
    rf"""(?P<name>(?:["'](?:{_NAMES})["']\s*:|\b(?:{_NAMES})\s*=))"""
    r"""(?P<sep>\s*)(?P<quote>["'])?(?P<value>(?(quote)[^"'\r\n]+|[^\s&,;"'}]+))""",
    re.IGNORECASE,
)

# Where a match of each IGNORECASE pattern can start: at one of these words (every spelling its
# alternatives allow), or for a pair also at the quote just before one. The patterns are tried there
# only, instead of at every character: every HTTP trace is scrubbed where it is stored, and four patterns
# tried along a Twilio exchange were, with the adapters' own redaction, a sixth of a sending worker's CPU.
_HEADER_WORDS = ("authorization", "proxy-authorization", "x-api-key")
_SCHEME_WORDS = ("basic", "bearer", "digest", "token")
_PAIR_WORDS = (
    "authorization", "proxy-authorization", "x-api-key", "api_key", "api-key", "apikey", "auth_token",
    "auth-token", "authtoken", "access_token", "access-token", "accesstoken", "token", "secret", "password",
    "passwd",
)  # fmt: skip
#: the characters besides ASCII letters that IGNORECASE takes for one and ``lower()`` does not turn into
#: it (İ and ı for i, ſ for s; the Kelvin sign lowers to k): folded before the words are looked for, so a
#: word spelt with them is found where the patterns find it. Each folds to one character, so a position
#: in the folded text is the same position in the text (``str.replace``: ``translate`` took 150 µs on a trace)
_FOLDS = (("\u0130", "i"), ("\u0131", "i"), ("\u017f", "s"))


def _pair(match: re.Match[str]) -> str:
    quote = match.group("quote") or ""
    return f"{match.group('name')}{match.group('sep')}{quote}{REDACTED}"


def _folded(text: str) -> str:
    """``text`` lowercased with ``_FOLDS`` applied: where a word occurs in it, IGNORECASE finds it in ``text``."""
    if not text.isascii():
        for odd, letter in _FOLDS:
            if odd in text:
                text = text.replace(odd, letter)
    return text.lower()


def _starts(folded: str, words: tuple[str, ...], *, quoted: bool = False) -> list[int]:
    """Where the words occur in the folded text (and, ``quoted``, one character before each)."""
    found: set[int] = set()
    for word in words:
        at = folded.find(word)
        while at >= 0:
            found.add(at)
            if quoted and at:
                found.add(at - 1)
            at = folded.find(word, at + 1)
    return sorted(found)


def _sub_at(pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str], text: str, starts: list[int]) -> str:
    """``pattern.sub(replace, text)`` for a pattern whose every match starts at one of ``starts``: the
    same matches, left to right, none overlapping the one before. ``text`` itself when nothing matched."""
    parts: list[str] = []
    done = 0
    for start in starts:
        if start < done:
            continue
        match = pattern.match(text, start)
        if match is not None:
            parts += (text[done:start], replace(match))
            done = match.end()
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def redact_credentials(text: str) -> str:
    """Replace credentials recognisable by their shape with ``[redacted]``."""
    # folded once, and again only after a pattern changed the text (positions moved)
    folded = _folded(text)
    done = _sub_at(_HEADER_RE, lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text, _starts(folded, _HEADER_WORDS))
    if done is not text:
        text, folded = done, _folded(done)
    done = _sub_at(_AUTH_SCHEME_RE, lambda m: f"{m.group(1)} {REDACTED}", text, _starts(folded, _SCHEME_WORDS))
    if done is not text:
        text, folded = done, _folded(done)
    text = _sub_at(_SECRET_PAIR_RE, _pair, text, _starts(folded, _PAIR_WORDS, quoted=True))
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
