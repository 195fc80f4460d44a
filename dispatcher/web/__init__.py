"""The ``web`` process: Twilio webhooks, ringback TwiML, delivery reports and the auditors' dashboard.

``ROUTE_MODULES`` lists the modules whose ``routes(runtime)`` make up the app;
a new concern adds its module here.
"""

from __future__ import annotations

from types import ModuleType

ROUTE_MODULES: list[ModuleType] = []

# provider webhooks and ringback TwiML
from . import twiml, webhooks  # noqa: E402 - the list above must exist before modules register

ROUTE_MODULES.extend([webhooks, twiml])

# the auditors' dashboard: login, runs, coverage heat map, delivery rates, ledger search
from . import dashboard  # noqa: E402

ROUTE_MODULES.append(dashboard)
