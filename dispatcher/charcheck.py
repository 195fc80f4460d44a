"""Characters that must never reach a message, a registry row or the delivery log.

A lone UTF-16 surrogate (``"\\ud800"`` in a double-quoted YAML string, undecodable
bytes in a CSV) cannot be encoded as UTF-8: it would pass validation and crash the
run that stores or sends it. A NUL byte or another control character in a name is
invisible to the operator, breaks PostgreSQL text columns and would be sent to a
resident as is. Both are refused where the text enters: campaign files, templates'
output and the resident registry.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

#: whitespace controls a multi-line YAML string (a folded title, a block variable) may carry
LINE_BREAKS = "\t\n\r"


@functools.cache
def _pattern(allow: str) -> re.Pattern[str]:
    controls = "".join(re.escape(chr(c)) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in allow)
    return re.compile(f"[{controls}\ud800-\udfff]")


def bad_character(text: str, *, allow: str = "") -> str | None:
    """Why ``text`` cannot be used (naming the first offending character), or None when it can."""
    found = _pattern(allow).search(text)
    if found is None:
        return None
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:  # how Python's surrogateescape carries a byte that is not UTF-8
        return f"contains a byte that is not UTF-8 text (0x{code - 0xDC00:02X})"
    if 0xD800 <= code <= 0xDFFF:
        return f"contains a lone surrogate U+{code:04X}, which is not text (a \\u escape of half a pair?)"
    return f"contains the control character U+{code:04X}"


def first_bad_text(value: Any, loc: tuple[Any, ...] = (), *, allow: str = "") -> tuple[tuple[Any, ...], str] | None:
    """The first key or string in parsed YAML/JSON that cannot be used: (its path, why), or None."""
    if isinstance(value, str):
        reason = bad_character(value, allow=allow)
        return (loc, reason) if reason else None
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(value, dict):
        for key in value:
            reason = bad_character(key) if isinstance(key, str) else None
            if reason:
                return ((*loc, key), f"field name {reason}")
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    for key, item in items:
        found = first_bad_text(item, (*loc, key), allow=allow)
        if found:
            return found
    return None
