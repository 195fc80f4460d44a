"""The ASGI application (Starlette) served by ``dispatch web``.

Each concern lives in its own module exposing ``routes(runtime) -> list[Route]``,
and every provider declares its webhook routes in the provider registry; this
module only assembles them around one ``Runtime``, behind the request guard
(guard.py: body limit, malformed headers) that every route shares. Provider
routes write through ``StoreDeliveryReports``, never the store itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from ..runtime import Runtime


def create_app(runtime: Runtime) -> Starlette:
    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "schema_version": runtime.store.schema_version()})

    routes: list[BaseRoute] = [Route("/healthz", health)]
    from ..providers import registry
    from .delivery_reports import StoreDeliveryReports

    # every provider's webhooks, writing delivery state through the port, never the store itself
    routes.extend(registry.routes(StoreDeliveryReports(runtime), runtime.settings))
    # each other concern adds its routes from its own module (dashboard, ...)
    from . import ROUTE_MODULES

    for module in ROUTE_MODULES:
        routes.extend(module.routes(runtime))
    from .guard import RequestGuard

    # inside Starlette's error middleware, so a body cut off mid-read is a 413, never a 500
    app = Starlette(routes=routes, middleware=[Middleware(RequestGuard, max_body=runtime.settings.web_max_body)])
    app.state.runtime = runtime
    return app
