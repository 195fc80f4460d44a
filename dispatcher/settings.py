"""Configuration, read once from the environment and passed down.

Nothing else in the package reads ``os.environ``: commands build one ``Settings``
at start-up and hand it (or the parts it needs) to the store, gateway and broker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ConfigError


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    #: SQLAlchemy URL of the delivery log; SQLite file by default
    database_url: str = "sqlite:///var/dispatch.db"
    #: ``redis://...`` to use Redis and separate worker processes; empty = embedded in-process broker
    broker_url: str = ""
    #: gateway adapter name: outbox (default), twilio, http
    gateway: str = "outbox"
    outbox_path: Path = Path("var/outbox.jsonl")
    campaigns_dir: Path = Path("campaigns")
    templates_dir: Path = Path("templates")
    #: recipients per Dramatiq message
    batch_size: int = 250
    #: worker threads per ``dispatch worker`` process
    worker_threads: int = 4
    #: how many times a retryable send is attempted before the row fails
    max_attempts: int = 5
    #: seconds after which a worker without a heartbeat is considered dead (its claims orphaned)
    worker_stale_after: int = 10
    #: where the embedded worker and ``dispatch worker`` log: "json" or "console"; empty = auto
    log_format: str = ""
    log_level: str = "INFO"
    #: the Redis namespace Dramatiq's keys live under (tests isolate themselves with it)
    broker_namespace: str = "dispatch"
    #: outbox fault injection for drills and tests: comma separated E.164 numbers
    outbox_fail_permanent: frozenset[str] = field(default_factory=frozenset)
    outbox_fail_transient: frozenset[str] = field(default_factory=frozenset)
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def numbers(name: str) -> frozenset[str]:
            return frozenset(n.strip() for n in env.get(name, "").split(",") if n.strip())

        batch_size = _int(env, "DISPATCH_BATCH_SIZE", 250)
        if not 1 <= batch_size <= 5000:
            raise ConfigError(f"DISPATCH_BATCH_SIZE: must be between 1 and 5000, got {batch_size}")
        return cls(
            database_url=env.get("DISPATCH_DATABASE_URL") or cls.database_url,
            broker_url=env.get("DISPATCH_BROKER_URL", ""),
            gateway=env.get("DISPATCH_GATEWAY") or "outbox",
            outbox_path=Path(env.get("DISPATCH_OUTBOX_PATH") or "var/outbox.jsonl"),
            campaigns_dir=Path(env.get("DISPATCH_CAMPAIGNS_DIR") or "campaigns"),
            templates_dir=Path(env.get("DISPATCH_TEMPLATES_DIR") or "templates"),
            batch_size=batch_size,
            worker_threads=_int(env, "DISPATCH_WORKER_THREADS", 4),
            max_attempts=_int(env, "DISPATCH_MAX_ATTEMPTS", 5),
            worker_stale_after=_int(env, "DISPATCH_WORKER_STALE_AFTER", 10),
            log_format=env.get("DISPATCH_LOG_FORMAT", ""),
            log_level=env.get("DISPATCH_LOG_LEVEL", "INFO"),
            broker_namespace=env.get("DISPATCH_BROKER_NAMESPACE") or "dispatch",
            outbox_fail_permanent=numbers("DISPATCH_OUTBOX_FAIL_PERMANENT"),
            outbox_fail_transient=numbers("DISPATCH_OUTBOX_FAIL_TRANSIENT"),
            extra={k: v for k, v in env.items() if k.startswith(("DISPATCH_", "TWILIO_"))},
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]  # dataclass fields are checked at runtime

    @property
    def embedded(self) -> bool:
        """True when no broker URL is set: runs are processed inside the ``dispatch run`` process."""
        return not self.broker_url
