"""One process's wiring: settings, store, gateway, broker, actors and clock, built once.

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

from .settings import Settings
from .store.sql import SqlStore, open_store, utcnow

if TYPE_CHECKING:
    import dramatiq

    from .gateways.base import Gateway


@dataclass
class Runtime:
    settings: Settings
    clock: Callable[[], datetime] = utcnow
    gateway_factory: Callable[[Settings], Gateway] | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    _store: SqlStore | None = None
    _gateway: Gateway | None = None
    _broker: dramatiq.Broker | None = None
    _actors: dict[str, Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store(self) -> SqlStore:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.settings.database_url, clock=self.clock)
            return self._store

    @property
    def gateway(self) -> Gateway:
        with self._lock:
            if self._gateway is None:
                if self.gateway_factory is not None:
                    self._gateway = self.gateway_factory(self.settings)
                else:
                    from .gateways import create_gateway

                    self._gateway = create_gateway(self.settings)
            return self._gateway

    @property
    def broker(self) -> dramatiq.Broker:
        with self._lock:
            if self._broker is None:
                from .broker import make_broker

                self._broker = make_broker(self.settings)
            return self._broker

    @property
    def actors(self) -> dict[str, Any]:
        broker = self.broker
        with self._lock:
            if self._actors is None:
                from .actors import declare

                self._actors = declare(broker, self)
            return self._actors

    def close(self) -> None:
        if self._gateway is not None:
            self._gateway.close()
        if self._store is not None:
            self._store.close()
        if self._broker is not None:
            self._broker.close()
