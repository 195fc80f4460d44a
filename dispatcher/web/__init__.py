"""The ``web`` process: the providers' webhooks (Twilio, delivery reports, ringback TwiML) and the dashboard.

``ROUTE_MODULES`` lists the modules whose ``routes(runtime)`` make up the app;
a new concern adds its module here. Provider webhooks come from the provider
registry (``providers/``), not from this list.
"""

from __future__ import annotations

from types import ModuleType

ROUTE_MODULES: list[ModuleType] = []

# the auditors' dashboard: login, runs, coverage heat map, delivery rates, ledger search
from . import dashboard  # noqa: E402 - the list above must exist before modules register

ROUTE_MODULES.append(dashboard)

# /metrics for Prometheus: counters of this process and the broker's queue depth
from . import scrape  # noqa: E402

ROUTE_MODULES.append(scrape)

# POST /api/alerts: early-warning alerts from the anti-fraud centre, authenticated by API key
from . import alerts_api  # noqa: E402

ROUTE_MODULES.append(alerts_api)
