"""Cross-cutting request guards of the web process, as one ASGI middleware around every route.

- A request body is limited (``DISPATCH_WEB_MAX_BODY``, 1 MB by default) *while it is
  read*: a ``Content-Length`` above the limit is refused before a byte is read, and a
  chunked body is counted as it arrives and cut off with 413 once it passes the limit,
  so a 200 MB POST never sits in the process's memory.
- Header values that are not ASCII (a forged signature, a cookie with a stray byte)
  are refused with 400 before any handler sees them: handlers compare signatures and
  cookies as ASCII and must never turn a malformed one into a 500.
"""

from __future__ import annotations

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    """The body passed the limit while it was being read."""


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for _name, value in scope.get("headers", ()):
            if not value.isascii():
                await PlainTextResponse("malformed request header", status_code=400)(scope, receive, send)
                return
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await self._too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:  # a handler that answered before reading everything: nothing more to say
                return
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = PlainTextResponse(
            f"request body too large (limit {self.max_body} bytes)", status_code=413, headers={"Connection": "close"}
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
