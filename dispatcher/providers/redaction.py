"""Redaction of what a provider exchange carries, before it is kept on a message's trace.

On top of ``dispatcher.redact.scrub`` (phone numbers and credentials recognisable by
shape), a ``Redactor`` knows the adapter's own secret values (its token, its
password, the values substituted into its config) and the field names that always
hold one, in headers, JSON, form bodies and URLs alike.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from ..redact import scrub

REDACTED = "[redacted]"
#: header and field names whose value is always a credential
_SECRET_NAMES = (
    "authorization",
    "token",
    "secret",
    "password",
    "api_key",
    "apikey",
    "x-api-key",
    "signature",
    "cookie",
)
#: texts up to this long are remembered once redacted (``Redactor.text``)
_CACHED_UP_TO = 512
#: bodies longer than this are cut in the trace (a batch of 10,000 numbers is not worth storing twice)
MAX_BODY_CHARS = 4000


class Redactor:
    """Replaces known secret values, credentials recognisable by shape and phone numbers anywhere in a value."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values: set[str] = set()
        for s in secrets:
            if s and len(s) >= 4:
                values.add(s)
                values.add(quote(s, safe=""))  # as it appears in a URL or a form body
        # longest first, so a secret containing another is replaced whole
        self.secrets = sorted(values, key=len, reverse=True)
        self._cached = functools.lru_cache(maxsize=4096)(self._text)

    def text(self, value: str) -> str:
        """``value`` with secrets, credentials and phone numbers replaced.

        A pure function of the value (the secrets never change), and most values of an exchange recur
        in every one (headers, the callback URL, the sender, the reply's fixed fields): the last few
        thousand answers are kept, so a gateway sending hundreds of messages a second does not scrub
        the same text again for each.
        """
        if len(value) > _CACHED_UP_TO:
            return self._text(value)
        return self._cached(value)

    def _text(self, value: str) -> str:
        if "%" in value:
            value = unquote(value)  # a number in a query string is %2B86...: decode so it is seen
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return scrub(value)

    def value(self, value: Any, key: str = "") -> Any:
        if key and any(word in key.lower() for word in _SECRET_NAMES):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {str(k): self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v, key) for v in value]
        return value

    def body(self, raw: bytes | str | None, content_type: str = "") -> Any:
        """A request or response body as data when it parses (JSON, form), else as text; redacted."""
        if raw is None or raw in (b"", ""):
            return None
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parsed: Any = text
        if "json" in content_type or text[:1] in ("{", "["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
        elif "x-www-form-urlencoded" in content_type:
            parsed = {}
            for k, v in parse_qsl(text, keep_blank_values=True):
                parsed[k] = v if k not in parsed else [*(parsed[k] if isinstance(parsed[k], list) else [parsed[k]]), v]
        redacted = self.value(parsed)
        if isinstance(redacted, str) and len(redacted) > MAX_BODY_CHARS:
            return redacted[:MAX_BODY_CHARS] + f"…[{len(redacted) - MAX_BODY_CHARS} more characters]"
        dumped = json.dumps(redacted, ensure_ascii=False)
        if len(dumped) > MAX_BODY_CHARS:
            return dumped[:MAX_BODY_CHARS] + f"…[{len(dumped) - MAX_BODY_CHARS} more characters]"
        return redacted
