"""One process's wiring: settings, store, gateway, broker and clock, built once.

The actors are declared on its broker by ``actors.declared(runtime)``: they wrap the pipeline's
functions, which take a Runtime, so the Runtime itself knows nothing of them.

Commands build a ``Runtime`` from ``Settings.from_env()``; tests build one from
explicit settings with an injected clock or gateway. Nothing here reads the
environment.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .broker import make_broker
from .clock import offset_clock
from .ratelimit import make_rate_limiter
from .settings import Settings
from .store import SqlStore, open_store, utcnow

if TYPE_CHECKING:
    import dramatiq

    from .providers.base import Gateway, RingbackGateway


@dataclass
class Runtime:
    settings: Settings
    clock: Callable[[], datetime] = utcnow
    gateway_factory: Callable[[Settings], Gateway] | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    _store: SqlStore | None = None
    _gateway: Gateway | None = None
    _broker: dramatiq.Broker | None = None
    #: the actors declared on this process's broker (``actors.declared``)
    _actors: dict[str, Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rate_limiter: Any = None
    #: builds the ringback adapter (tests inject one); default: DISPATCH_RINGBACK_GATEWAY
    ringback_factory: Callable[[Settings], RingbackGateway] | None = None
    _ringback: RingbackGateway | None = None
    #: set when the process is asked to stop (SIGTERM): batches hand out no new sends and release the rest
    stopping: threading.Event = field(default_factory=threading.Event)
    #: why this process cannot go on (its delivery log cannot be written); the embedded run reports it
    fatal: str | None = None

    def __post_init__(self) -> None:
        # DISPATCH_CLOCK_OFFSET / DISPATCH_FAKE_NOW move a subprocess's business clock (tests, drills);
        # a clock injected by the caller wins
        if self.clock is utcnow and self.settings.clock_offset:
            self.clock = offset_clock(self.settings.clock_offset)

    @property
    def rate_limiter(self) -> Any:
        """The gateway's shared pacer (Redis across processes, in-memory on the embedded broker), or None."""
        with self._lock:
            if self._rate_limiter is None and self.settings.rate_limit > 0:
                self._rate_limiter = make_rate_limiter(self.settings)
            return self._rate_limiter

    @property
    def store(self) -> SqlStore:
        with self._lock:
            if self._store is None:
                # each provider declares whose rows its delivery reports may move; the store knows no providers
                from .providers.registry import reporter_gateways

                self._store = open_store(
                    self.settings.database_url, clock=self.clock, reporter_gateways=reporter_gateways()
                )
            return self._store

    @property
    def gateway(self) -> Gateway:
        with self._lock:
            if self._gateway is None:
                if self.gateway_factory is not None:
                    self._gateway = self.gateway_factory(self.settings)
                else:
                    # the registry loads every provider's package and client library: only when one is needed
                    from .providers.registry import create_gateway

                    self._gateway = create_gateway(self.settings)
            return self._gateway

    @property
    def ringback(self) -> RingbackGateway:
        """The ringback-tone adapter ``DISPATCH_RINGBACK_GATEWAY`` names (``providers/``), built on first use."""
        with self._lock:
            if self._ringback is None:
                if self.ringback_factory is not None:
                    self._ringback = self.ringback_factory(self.settings)
                else:
                    from .providers.registry import create_ringback

                    self._ringback = create_ringback(self.settings)
            return self._ringback

    @property
    def broker(self) -> dramatiq.Broker:
        with self._lock:
            if self._broker is None:
                self._broker = make_broker(self.settings)
            return self._broker

    def close(self) -> None:
        if self._gateway is not None:
            self._gateway.close()
        if self._ringback is not None:
            self._ringback.close()
        if self._store is not None:
            self._store.close()
        if self._broker is not None:
            self._broker.close()
