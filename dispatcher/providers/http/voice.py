"""``DISPATCH_VOICE_GATEWAY=http``: a carrier's voice-notification (TTS call) API plugged in by a config file.

The config (``DISPATCH_VOICE_CONFIG``) has the HTTP adapter's format and is read by the same
``load_config``: safe YAML, ``${DISPATCH_HTTP_SECRET_*}`` secrets redacted from every trace, one
error table (the codes it names). ``{body}`` is what the call says (the warning for that
recipient); ``response.message_id`` is the call's id. Such APIs place one call per request, so
a ``batch`` section is refused. The carrier reports each call's fate to
``/webhooks/http/voice/report`` (``webhooks.py``), signed like the SMS delivery reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from .gateway import HttpConfigError, HttpGateway, load_config


class HttpVoice(HttpGateway):
    name = "http-voice"


def load_voice(path: Path, *, env: Any, timeout: float, transport: httpx.BaseTransport | None = None) -> HttpVoice:
    config = load_config(path, env=env)
    if config.batch is not None:
        raise HttpConfigError(
            "a voice call carries one number: remove the batch section", path=str(path), field="batch"
        )
    return HttpVoice(config, timeout=timeout, transport=transport)
