"""The ``web`` process: Twilio webhooks, ringback TwiML, delivery reports and the auditors' dashboard.

``ROUTE_MODULES`` lists the modules whose ``routes(runtime)`` make up the app;
a new concern adds its module here.
"""

from __future__ import annotations

from types import ModuleType

ROUTE_MODULES: list[ModuleType] = []
