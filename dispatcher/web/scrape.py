"""``GET /metrics``: this web process's metrics and the broker's queue depth, for Prometheus.

No login: Prometheus scrapes without a session, and nothing here names a person: the
labels are gateways, outcomes, error codes, lanes and campaign ids (see ``dispatcher.metrics``).
Where the web process faces the internet for provider callbacks, the reverse proxy keeps this
path to the operators' network: send rates and error codes are nobody else's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import metrics
from ..broker import queue_depths

if TYPE_CHECKING:
    from ..runtime import Runtime


def routes(runtime: Runtime) -> list[BaseRoute]:
    # the broker is read at each scrape (never cached): the depth is Redis's, not a stale guess
    registry = metrics.scrape_registry(metrics.QueueDepth(lambda: queue_depths(runtime.broker)))

    def scrape(_request: Request) -> Response:
        # a plain function: Starlette runs it in its thread pool, so the Redis round trip blocks no request
        body, content_type = metrics.exposition(registry)
        return Response(body, media_type=content_type)

    return [Route("/metrics", scrape, methods=["GET"])]
