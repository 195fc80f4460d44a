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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import domain, themes
from .broker import make_broker
from .clock import offset_clock
from .ratelimit import make_rate_limiter
from .settings import Settings
from .store import SqlStore, open_store, utcnow
from .themes import Plan

if TYPE_CHECKING:
    import dramatiq

    from .providers.base import Gateway, RingbackGateway, VoiceGateway
    from .providers.failover import CircuitBreaker


@dataclass
class Runtime:
    settings: Settings
    clock: Callable[[], datetime] = utcnow
    gateway_factory: Callable[[Settings], Gateway] | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    _store: SqlStore | None = None
    #: SMS adapters by provider name, and the failover lists and circuit breakers over them
    _gateways: dict[str, Gateway] = field(default_factory=dict)
    _failovers: dict[tuple[str, ...], Gateway] = field(default_factory=dict)
    _breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    _broker: dramatiq.Broker | None = None
    #: the actors declared on this process's broker (``actors.declared``)
    _actors: dict[str, Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rate_limiter: Any = None
    #: builds the ringback adapter (tests inject one); default: DISPATCH_RINGBACK_GATEWAY
    ringback_factory: Callable[[Settings], RingbackGateway] | None = None
    _ringback: RingbackGateway | None = None
    _plans: dict[str, Plan] | None = None
    #: builds the voice adapter (tests inject one); default: DISPATCH_VOICE_GATEWAY
    voice_factory: Callable[[Settings], VoiceGateway] | None = None
    _voice: VoiceGateway | None = None
    #: set when the process is asked to stop (SIGTERM): batches hand out no new sends and release the rest
    stopping: threading.Event = field(default_factory=threading.Event)
    #: why this process cannot go on (its delivery log cannot be written); the embedded run reports it
    fatal: str | None = None

    def __post_init__(self) -> None:
        # DISPATCH_CLOCK_OFFSET / DISPATCH_FAKE_NOW move a subprocess's business clock (tests, drills);
        # a clock injected by the caller wins
        if self.clock is utcnow and self.settings.clock_offset:
            self.clock = offset_clock(self.settings.clock_offset)
        # the organisation (districts, groups, departments) every module reads through ``domain``:
        # the project's organisation.yaml, read once; a broken one stops the command (one line, exit 2)
        domain.use_file(self.settings.organisation_file)
        # the plan periods and quarterly themes, read here too: a broken themes.yaml stops any command alike
        path = self.settings.themes_file or self.settings.templates_dir.parent / themes.FILE_NAME
        self._plans = themes.load_optional(path)

    @property
    def rate_limiter(self) -> Any:
        """The gateway's shared pacer (Redis or the database across processes, in-memory on the embedded
        broker), or None."""
        settings = self.settings
        # the store first: its property takes the same lock
        needs_store = settings.rate_limit > 0 and not settings.embedded and not settings.coordination_redis_url
        store = self.store if needs_store else None
        with self._lock:
            if self._rate_limiter is None and settings.rate_limit > 0:
                self._rate_limiter = make_rate_limiter(settings, store)
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
        """The SMS gateway ``DISPATCH_GATEWAY`` names: one adapter, or a failover list over several."""
        return self.gateway_for(None)

    def gateway_for(self, names: Sequence[str] | None) -> Gateway:
        """The gateway of an ordered provider list (a campaign's ``gateways:``; None: ``DISPATCH_GATEWAY``).

        Each adapter is built once per process and shared by every list naming it, and so is its
        circuit breaker: a provider found down while sending one campaign is passed over by all.
        """
        wanted = tuple(names) if names else self.settings.gateways
        with self._lock:
            if len(wanted) == 1:
                return self._member(wanted[0])
            built = self._failovers.get(wanted)
            if built is None:
                from .providers.failover import CircuitBreaker, FailoverGateway

                members = [self._member(name) for name in wanted]
                for member in members:
                    if member.name not in self._breakers:
                        self._breakers[member.name] = CircuitBreaker(
                            member.name, cooldown=self.settings.failover_cooldown
                        )
                built = FailoverGateway(members, self._breakers)
                self._failovers[wanted] = built
            return built

    def plans(self) -> dict[str, Plan]:
        """The plan periods and quarterly themes of the project's themes.yaml (none without one), read at start."""
        return dict(self._plans or {})

    def known_gateways(self) -> list[str]:
        """The SMS provider names a campaign's ``gateways:`` list may use (every registered one)."""
        from .providers.registry import gateway_names

        return gateway_names()

    def _member(self, name: str) -> Gateway:
        """One provider's adapter, built on first use (under ``_lock``)."""
        adapter = self._gateways.get(name)
        if adapter is None:
            if self.gateway_factory is not None:
                adapter = self.gateway_factory(self.settings.with_(gateway=name))
            else:
                # the registry loads every provider's package and client library: only when one is needed
                from .providers.registry import create_gateway

                adapter = create_gateway(self.settings, name)
            self._gateways[name] = adapter
        return adapter

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
    def voice(self) -> VoiceGateway:
        """The voice-call adapter ``DISPATCH_VOICE_GATEWAY`` names (``providers/``), built on first use."""
        with self._lock:
            if self._voice is None:
                if self.voice_factory is not None:
                    self._voice = self.voice_factory(self.settings)
                else:
                    from .providers.registry import create_voice

                    self._voice = create_voice(self.settings)
            return self._voice

    @property
    def broker(self) -> dramatiq.Broker:
        with self._lock:
            if self._broker is None:
                self._broker = make_broker(self.settings)
            return self._broker

    def close(self) -> None:
        for adapter in self._gateways.values():
            adapter.close()
        if self._ringback is not None:
            self._ringback.close()
        if self._voice is not None:
            self._voice.close()
        if self._store is not None:
            self._store.close()
        if self._broker is not None:
            self._broker.close()
