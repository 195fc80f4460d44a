"""What every provider's webhooks share: reading a form body, and the words that opt a number out or in.

China's rules (T / TD / 退订) and Twilio's own STOP words, compared case-folded.
A STOP from a number that is not in the registry records nothing (there is no
resident to mark), so the reply says so instead of confirming an opt-out that did
not happen.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request

#: replies that opt a number out (China: T / TD / 退订; Twilio's own STOP words), compared case-folded
OPT_OUT_WORDS = frozenset({"stop", "t", "td", "退订", "stopall", "unsubscribe", "cancel", "end", "quit"})
OPT_IN_WORDS = frozenset({"start", "unstop"})
OPT_OUT_REPLY = "【常州经开区反诈中心】您已退订，将不再收到反诈提醒短信。回复START可重新订阅。"
OPT_IN_REPLY = "【常州经开区反诈中心】您已重新订阅反诈提醒短信。回T退订。"
#: the truthful answer when the number is not in the registry: nothing was recorded either way
NOT_REGISTERED_REPLY = "【常州经开区反诈中心】本号码不在反诈提醒名单中，未作任何登记。"


def keyword(body: str) -> str | None:
    """``"opt_out"``, ``"opt_in"`` or None for the text of an inbound SMS."""
    word = body.strip().casefold()
    if word in OPT_OUT_WORDS:
        return "opt_out"
    if word in OPT_IN_WORDS:
        return "opt_in"
    return None


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (what Twilio posts), last value wins.

    Parsed here rather than with ``request.form()`` so the web process needs no
    multipart parser for the one encoding Twilio uses.
    """
    body = await request.body()  # at most DISPATCH_WEB_MAX_BODY bytes: the web app's guard cuts it off
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
