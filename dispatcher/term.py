"""The CLI's consoles: text from files, providers and the database is shown, never obeyed.

Campaign titles, template names, provider ids and error messages come from people and
systems other than the operator reading the terminal. Two things in such text could
act on the terminal instead of being shown: escape sequences (``ESC ]0;...`` retitles
the window, ``ESC [2J`` clears it, OSC 8 plants links) and Rich markup (``[link=...]``,
``[/]``). So both consoles parse no markup at all (our own emphasis is passed as
styled ``Text``), and every string they render has its control characters replaced
by a visible ``\\xNN`` before Rich sees it.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.text import Text

#: C0 controls except tab and newline, DEL, and C1 controls (0x80-0x9f: 8-bit CSI/OSC)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """``text`` with every control character shown as ``\\xNN`` instead of sent to the terminal."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


class SafeConsole(Console):
    """A Rich console that renders no markup and no control characters from the strings it prints."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs["markup"] = False
        return super().render_str(safe(text), **kwargs)
