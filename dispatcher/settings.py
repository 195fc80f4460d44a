"""Configuration, read once from the environment and passed down.

Nothing else in the package reads ``os.environ``: commands build one ``Settings``
at start-up and hand it (or the parts it needs) to the store, gateway and broker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .campaigns import parse_duration
from .errors import ConfigError


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from exc


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise ConfigError(f"{name}: must be 1 or more, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name}: must be more than 0, got {raw!r}")
    return value


def _port(env: Mapping[str, str], name: str) -> int:
    value = _int(env, name, 0)
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name}: expected a port between 1 and 65535 (0 = off), got {value}")
    return value


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(env: Mapping[str, str]) -> str:
    raw = (env.get("DISPATCH_LOG_LEVEL") or "").strip().upper()
    if raw and raw not in _LOG_LEVELS:
        raise ConfigError(f"DISPATCH_LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {raw!r}")
    return raw


def find_project_root(start: Path) -> Path:
    """The nearest folder from ``start`` upwards that holds both ``campaigns/`` and ``templates/``.

    Commands work the same from any folder inside a project (an operator in ``campaigns/``
    still gets the project's templates and delivery log); outside any project, ``start`` itself.
    """
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "campaigns").is_dir() and (folder / "templates").is_dir():
            return folder
    return start


#: the environment variables an HTTP gateway/ringback config may substitute with ``${NAME}``
GATEWAY_SECRET_PREFIX = "DISPATCH_HTTP_SECRET_"
#: shortest DISPATCH_SESSION_SECRET accepted (python -c "import secrets; print(secrets.token_hex(32))" makes one)
MIN_SESSION_SECRET = 32


def _session_secret(env: Mapping[str, str]) -> str:
    secret = env.get("DISPATCH_SESSION_SECRET", "")
    if secret and len(secret) < MIN_SESSION_SECRET:
        raise ConfigError(
            f"DISPATCH_SESSION_SECRET: at least {MIN_SESSION_SECRET} characters, got {len(secret)} "
            "(make one with: python -c 'import secrets; print(secrets.token_hex(32))', or leave it unset)"
        )
    return secret


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    #: the folder holding campaigns/ and templates/; relative defaults below resolve against it
    project_root: Path = Path(".")
    #: SQLAlchemy URL of the delivery log; SQLite file by default
    database_url: str = "sqlite:///var/dispatch.db"
    #: ``redis://...`` or ``amqp://...`` (RabbitMQ) to use separate worker processes; empty = embedded broker
    broker_url: str = ""
    #: with a RabbitMQ broker, the Redis that shares the rate limiter's schedule and the scheduler's lease
    #: across hosts; empty = the database keeps both (``coordination_redis_url``)
    redis_url: str = ""
    #: gateway adapter name: outbox (default), twilio, http, kannel; or an ordered failover list
    #: ``twilio,http`` (see ``gateways``)
    gateway: str = "outbox"
    outbox_path: Path = Path("var/outbox.jsonl")
    campaigns_dir: Path = Path("campaigns")
    templates_dir: Path = Path("templates")
    #: the project's organisation.yaml (departments, groups, districts, grids); None: the one shipped in the package
    organisation_file: Path | None = None
    #: the project's themes.yaml (plan periods and their quarterly themes); None: beside templates/
    themes_file: Path | None = None
    #: what each department and town must reach per quarter (dispatch report assessment)
    targets_path: Path = Path("targets.yaml")
    #: recipients per Dramatiq message
    batch_size: int = 250
    #: worker threads per ``dispatch worker`` process. Two: while one batch waits on the database, the
    #: other renders and records. More threads only take turns at the GIL, and cost CPU doing it: two
    #: workers sent 18,000-20,500 recipients/s through the outbox with two threads each, 13,400-14,600/s
    #: with four (``bench/bench_pipeline.py``). A slow provider is waited on inside a batch, up to
    #: ``gateway_concurrency`` requests at once, not by more threads (Twilio: 596 vs 597 msg/s).
    worker_threads: int = 2
    #: how many times a retryable send is attempted before the row fails
    max_attempts: int = 5
    #: seconds after which a worker without a heartbeat is considered dead (its claims orphaned)
    worker_stale_after: int = 10
    #: where the embedded worker and ``dispatch worker`` log: "json" or "console"; empty = auto
    log_format: str = ""
    #: empty = per command: INFO for long-running processes (worker, scheduler, web), WARNING otherwise
    log_level: str = ""
    #: the Redis namespace Dramatiq's keys live under (tests isolate themselves with it)
    broker_namespace: str = "dispatch"
    #: outbox fault injection for drills and tests: comma separated E.164 numbers
    outbox_fail_permanent: frozenset[str] = field(default_factory=frozenset)
    outbox_fail_transient: frozenset[str] = field(default_factory=frozenset)
    #: simulated per-message latency of the outbox (drills: a slow gateway); 0 = none
    outbox_latency_ms: int = 0
    #: outbox delivery status for drills: numbers whose message the outbox reports undelivered, and numbers
    #: it never gives a final status for (everything else in the file is delivered)
    outbox_undelivered: frozenset[str] = field(default_factory=frozenset)
    outbox_no_report: frozenset[str] = field(default_factory=frozenset)
    # --- real gateways -----------------------------------------------------------
    #: where providers reach our web process (status callbacks, TwiML); signatures are checked against it
    public_url: str = ""
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_from: str = ""
    twilio_messaging_service_sid: str = ""
    #: redirects the Twilio client (a regional edge, or a local Twilio peer such as Prism)
    twilio_base_url: str = ""
    #: Kannel (DISPATCH_GATEWAY=kannel): smsbox's sendsms URL, e.g. http://127.0.0.1:13013/cgi-bin/sendsms
    kannel_sendsms_url: str = ""
    #: a ``sendsms-user`` group of kannel.conf; the password is a secret (never in repr, logs or traces)
    kannel_username: str = ""
    kannel_password: str = field(default="", repr=False)
    #: sender shown to residents (``from``); empty = the sendsms-user's ``default-sender``/``global-sender``
    kannel_from: str = ""
    #: keys the token each delivery-report URL carries: Kannel signs nothing it calls back with
    kannel_dlr_secret: str = field(default="", repr=False)
    #: seconds to wait for a provider's reply before the send counts as ambiguous
    gateway_timeout: float = 10.0
    #: requests a network gateway (Twilio, the HTTP adapter, carrier-http ringback) keeps in flight at
    #: once per worker process. A provider answers each request after 100-300 ms, so one at a time
    #: caps a worker at a few messages a second per thread whatever the contracted rate; the
    #: provider's rate (DISPATCH_RATE_LIMIT) is the limit to reach. 50 lets one worker carry ~300
    #: msg/s at 150 ms a reply and two workers stay within Twilio's ~100 concurrent requests per
    #: account; raise it with the number of workers only as far as the provider's own cap allows
    gateway_concurrency: int = 50
    #: config file of the generic HTTP adapter (DISPATCH_GATEWAY=http)
    http_config: Path | None = None
    #: shared secret of the HTTP adapter's delivery reports (HMAC-SHA256 of the body)
    http_report_secret: str = ""
    #: ringback adapter: outbox (default), twilio-announce, carrier-http
    ringback_gateway: str = "outbox"
    #: config file of the carrier-http ringback adapter
    ringback_config: Path | None = None
    #: voice-call adapter: outbox (default, drills: no call is placed), twilio, http
    voice_gateway: str = "outbox"
    #: config file of the http voice adapter (same format as DISPATCH_HTTP_CONFIG)
    voice_config: Path | None = None
    #: largest audience a voice campaign may call: calls are for small, urgent audiences
    voice_max_audience: int = 500
    #: signs dashboard session cookies (HMAC-SHA256), at least 32 characters; empty = a random secret kept
    #: in the delivery log (sessions themselves are rows there, so they can be ended at once)
    session_secret: str = ""
    #: seconds a dashboard login lasts
    session_max_age: int = 8 * 3600
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    #: largest request body any route reads, in bytes; a bigger one gets 413 while it is still arriving
    web_max_body: int = 1 << 20
    #: where ``dispatch worker`` and ``dispatch scheduler`` serve their Prometheus metrics (``/metrics``);
    #: port 0 = no exporter. Each process has its own counters, so each needs its own port on a host
    #: (``--metrics-port``); ``dispatch web`` serves its own on its web port instead
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # --- scheduler and run control -----------------------------------------------
    #: seconds added to the real clock: drills and tests move every process to another hour or quarter
    #: without sleeping through it (DISPATCH_CLOCK_OFFSET, or DISPATCH_FAKE_NOW as an ISO time)
    clock_offset: float = 0.0
    #: gateway rate shared by every worker process (0 = unlimited); counted in ``rate_unit``
    rate_limit: float = 0.0
    #: "messages" or "parts": what the gateway contract counts
    rate_unit: str = "messages"
    #: default frequency cap: at most this many bulk messages per person per rolling period (0 = no cap)
    frequency_cap_max: int = 2
    frequency_cap_period: str = "7d"
    #: False only with DISPATCH_SEND_WINDOW=ignore: local outbox demos and tests not about the window
    send_window_enforced: bool = True
    #: longest a batch deferred by the send window sleeps before it looks at the clock again
    window_recheck: float = 300.0
    #: seconds a scheduler's leadership lasts unless renewed; a dead leader is replaced after this
    scheduler_lease: float = 10.0
    #: how often the scheduler looks for due fires and renews its lease
    scheduler_tick: float = 0.5
    #: threads a ``dispatch worker`` on all lanes keeps for urgent work alone
    urgent_threads: int = 2
    # --- faults: stalls, outages, stops ------------------------------------------
    #: where a worker keeps results it could not write to the delivery log until the log is back
    spool_dir: Path = Path("var/spool")
    #: how long a worker keeps retrying to record a batch's results before giving the message back
    record_retry_for: float = 600.0
    #: a running run with rows due and no row moving for this long is stalled: the watchdog re-queues it
    stall_after: float = 30.0
    #: a row in ``sending`` whose claim was not renewed for this long is reconciled by the watchdog even if
    #: its worker still beats (a worker stuck in one hand-over stops renewing)
    sending_deadline: float = 900.0
    #: how often the scheduler's leader runs the watchdog
    watchdog_every: float = 5.0
    #: seconds a provider's circuit stays open (messages go to the next provider) before one probes it
    failover_cooldown: float = 30.0
    # --- delivery reports ----------------------------------------------------------
    #: seconds after the hand-over before a row still ``sent`` (no final report) is asked about
    dlr_chase_after: float = 1800.0
    #: seconds after the hand-over before a row still ``sent`` is marked ``unconfirmed``
    dlr_deadline: float = 72 * 3600.0
    #: how often the scheduler's leader runs the delivery-report sweep
    dlr_every: float = 60.0
    #: how long per-attempt HTTP traces are kept: what ``dispatch purge`` clears when given no
    #: ``--traces-older-than`` (the attempts and the ledger are kept whatever this says)
    trace_retention: str = "30d"
    #: what ``${NAME}`` in an HTTP gateway or ringback config may name: only DISPATCH_HTTP_SECRET_* variables,
    #: so a config file can never send the program's own settings (session secret, database URL) anywhere
    gateway_secrets: Mapping[str, str] = field(default_factory=dict)
    #: CNY per SMS part, per provider (DISPATCH_PART_PRICES); a provider not listed costs 0. Each run
    #: records the prices of its creation, so a later change of price never reprices old spend
    part_prices: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PART_PRICES))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def numbers(name: str) -> frozenset[str]:
            return frozenset(n.strip() for n in env.get(name, "").split(",") if n.strip())

        redis_url = env.get("DISPATCH_REDIS_URL", "")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"DISPATCH_REDIS_URL: expected a redis:// URL, got {redis_url.split(':')[0]}://")
        batch_size = _int(env, "DISPATCH_BATCH_SIZE", 250)
        gateway_concurrency = _int(env, "DISPATCH_GATEWAY_CONCURRENCY", 50)
        if not 1 <= gateway_concurrency <= 1000:
            raise ConfigError(f"DISPATCH_GATEWAY_CONCURRENCY: must be between 1 and 1000, got {gateway_concurrency}")
        if not 1 <= batch_size <= 5000:
            raise ConfigError(f"DISPATCH_BATCH_SIZE: must be between 1 and 5000, got {batch_size}")
        cwd = Path.cwd()
        root = find_project_root(cwd)

        def under_root(*parts: str) -> Path:
            # relative to where the operator stands, so messages name `campaigns/x.yaml`, not a long absolute path
            return Path(os.path.relpath(root.joinpath(*parts), cwd))

        return cls(
            project_root=root,
            database_url=env.get("DISPATCH_DATABASE_URL") or f"sqlite:///{under_root('var', 'dispatch.db')}",
            broker_url=env.get("DISPATCH_BROKER_URL", ""),
            redis_url=redis_url,
            gateway=",".join(gateway_list(env.get("DISPATCH_GATEWAY") or "outbox", check=True)),
            outbox_path=Path(env.get("DISPATCH_OUTBOX_PATH") or under_root("var", "outbox.jsonl")),
            campaigns_dir=Path(env.get("DISPATCH_CAMPAIGNS_DIR") or under_root("campaigns")),
            templates_dir=Path(env.get("DISPATCH_TEMPLATES_DIR") or under_root("templates")),
            organisation_file=under_root("organisation.yaml") if (root / "organisation.yaml").is_file() else None,
            themes_file=under_root("themes.yaml"),
            targets_path=Path(env.get("DISPATCH_TARGETS_PATH") or under_root("targets.yaml")),
            batch_size=batch_size,
            worker_threads=_int(env, "DISPATCH_WORKER_THREADS", 2),
            max_attempts=_int(env, "DISPATCH_MAX_ATTEMPTS", 5),
            worker_stale_after=_int(env, "DISPATCH_WORKER_STALE_AFTER", 10),
            log_format=env.get("DISPATCH_LOG_FORMAT", ""),
            log_level=_log_level(env),
            broker_namespace=env.get("DISPATCH_BROKER_NAMESPACE") or "dispatch",
            outbox_fail_permanent=numbers("DISPATCH_OUTBOX_FAIL_PERMANENT"),
            outbox_fail_transient=numbers("DISPATCH_OUTBOX_FAIL_TRANSIENT"),
            outbox_latency_ms=_int(env, "DISPATCH_OUTBOX_LATENCY_MS", 0),
            outbox_undelivered=numbers("DISPATCH_OUTBOX_UNDELIVERED"),
            outbox_no_report=numbers("DISPATCH_OUTBOX_NO_REPORT"),
            public_url=(env.get("DISPATCH_PUBLIC_URL") or "").rstrip("/"),
            twilio_account_sid=env.get("TWILIO_ACCOUNT_SID", ""),
            twilio_auth_token=env.get("TWILIO_AUTH_TOKEN", ""),
            twilio_from=env.get("TWILIO_FROM", ""),
            twilio_messaging_service_sid=env.get("TWILIO_MESSAGING_SERVICE_SID", ""),
            twilio_base_url=(env.get("DISPATCH_TWILIO_BASE_URL") or "").rstrip("/"),
            kannel_sendsms_url=env.get("DISPATCH_KANNEL_URL", ""),
            kannel_username=env.get("DISPATCH_KANNEL_USERNAME", ""),
            kannel_password=env.get("DISPATCH_KANNEL_PASSWORD", ""),
            kannel_from=env.get("DISPATCH_KANNEL_FROM", ""),
            kannel_dlr_secret=env.get("DISPATCH_KANNEL_DLR_SECRET", ""),
            gateway_timeout=_float(env, "DISPATCH_GATEWAY_TIMEOUT", 10.0),
            gateway_concurrency=gateway_concurrency,
            http_config=Path(env["DISPATCH_HTTP_CONFIG"]) if env.get("DISPATCH_HTTP_CONFIG") else None,
            http_report_secret=env.get("DISPATCH_HTTP_REPORT_SECRET", ""),
            ringback_gateway=env.get("DISPATCH_RINGBACK_GATEWAY") or "outbox",
            ringback_config=Path(env["DISPATCH_RINGBACK_CONFIG"]) if env.get("DISPATCH_RINGBACK_CONFIG") else None,
            voice_gateway=env.get("DISPATCH_VOICE_GATEWAY") or "outbox",
            voice_config=Path(env["DISPATCH_VOICE_CONFIG"]) if env.get("DISPATCH_VOICE_CONFIG") else None,
            voice_max_audience=_positive(env, "DISPATCH_VOICE_MAX_AUDIENCE", 500),
            session_secret=_session_secret(env),
            session_max_age=_int(env, "DISPATCH_SESSION_MAX_AGE", 8 * 3600),
            web_host=env.get("DISPATCH_WEB_HOST") or "127.0.0.1",
            web_port=_int(env, "DISPATCH_WEB_PORT", _int(env, "PORT", 8000)),
            web_max_body=_positive(env, "DISPATCH_WEB_MAX_BODY", 1 << 20),
            metrics_host=env.get("DISPATCH_METRICS_HOST") or "127.0.0.1",
            metrics_port=_port(env, "DISPATCH_METRICS_PORT"),
            **_schedule_settings(env),
            **_fault_settings(env),
            **_dlr_settings(env),
            trace_retention=_retention(env),
            gateway_secrets={k: v for k, v in env.items() if k.startswith(GATEWAY_SECRET_PREFIX)},
            part_prices=part_prices(env.get("DISPATCH_PART_PRICES")),
        )

    @property
    def gateways(self) -> tuple[str, ...]:
        """``DISPATCH_GATEWAY`` as the ordered list of providers it names (one name: no failover)."""
        return gateway_list(self.gateway)

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]  # dataclass fields are checked at runtime

    @property
    def secure_cookies(self) -> bool:
        """Cookies get ``Secure`` unless the dashboard is plainly served on this machine only.

        Served behind TLS (DISPATCH_PUBLIC_URL https://...) or bound to an address other
        machines reach, a cookie sent over plain HTTP could be read on the way.
        """
        if self.public_url.startswith("https://"):
            return True
        return not _loopback(self.web_host)

    @property
    def embedded(self) -> bool:
        """True when no broker URL is set: runs are processed inside the ``dispatch run`` process."""
        return not self.broker_url

    @property
    def broker_kind(self) -> str:
        """``embedded``, ``redis`` or ``rabbitmq``, from the broker URL's scheme (checked by ``make_broker``)."""
        if self.embedded:
            return "embedded"
        return "rabbitmq" if self.broker_url.startswith(("amqp://", "amqps://")) else "redis"

    @property
    def coordination_redis_url(self) -> str:
        """The Redis that paces sends and elects the scheduler's leader; empty = the database does.

        A Redis broker is that Redis. A RabbitMQ broker has no shared counter or expiring key to
        build either on, so ``DISPATCH_REDIS_URL`` may name a Redis for them; without one the
        delivery log keeps the rate schedule and the lease, which every process already reaches.
        """
        if self.broker_kind == "redis":
            return self.broker_url
        if self.broker_kind == "rabbitmq":
            return self.redis_url
        return ""


#: list prices of a domestic SMS part in CNY, so that a demo or a fresh deployment shows non-zero costs;
#: a deployment sets its contract's prices in DISPATCH_PART_PRICES
DEFAULT_PART_PRICES: dict[str, float] = {"twilio": 0.05, "http": 0.045, "kannel": 0.04, "outbox": 0.05}


def part_prices(text: str | None) -> dict[str, float]:
    """``twilio=0.05,http=0.045`` -> {"twilio": 0.05, "http": 0.045}; unset = ``DEFAULT_PART_PRICES``.

    Whether each name is a registered provider is not checked here (settings must not import the
    providers): a price for a provider never used is harmless, a provider without one costs 0.
    """
    if text is None or not text.strip():
        return dict(DEFAULT_PART_PRICES)
    prices: dict[str, float] = {}
    for item in text.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not item.strip():
            continue
        try:
            price = float(raw) if sep and name else -1.0
        except ValueError:
            price = -1.0
        if price < 0 or price != price or price == float("inf"):
            raise ConfigError(
                f"DISPATCH_PART_PRICES: expected gateway=CNY per part such as twilio=0.05, got {item.strip()!r}"
            )
        if name in prices:
            raise ConfigError(f"DISPATCH_PART_PRICES: {name} priced twice")
        prices[name] = price
    return prices


def _retention(env: Mapping[str, str]) -> str:
    raw = (env.get("DISPATCH_TRACE_RETENTION") or "30d").strip()
    try:
        if parse_duration(raw) <= timedelta(0):
            raise ValueError("the period must be longer than 0")
    except ValueError as exc:
        raise ConfigError(f"DISPATCH_TRACE_RETENTION: {exc}") from exc
    return raw


def _fault_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Watchdog, spool and record-retry settings."""
    return {
        "spool_dir": Path(env.get("DISPATCH_SPOOL_DIR") or "var/spool"),
        "record_retry_for": _float(env, "DISPATCH_RECORD_RETRY_FOR", 600.0),
        "stall_after": _float(env, "DISPATCH_STALL_AFTER", 30.0),
        "sending_deadline": _float(env, "DISPATCH_SENDING_DEADLINE", 900.0),
        "watchdog_every": _float(env, "DISPATCH_WATCHDOG_EVERY", 5.0),
        "failover_cooldown": _float(env, "DISPATCH_FAILOVER_COOLDOWN", 30.0),
    }


def gateway_list(text: str, *, check: bool = False) -> tuple[str, ...]:
    """``twilio, http`` -> ("twilio", "http"); with ``check``, an empty or repeated name is a ConfigError.

    Whether each name is a registered provider is checked when the gateway is built (the registry
    knows them; settings must not import the providers).
    """
    names = tuple(n.strip() for n in text.split(","))
    if check:
        if any(not n for n in names):
            raise ConfigError(f"DISPATCH_GATEWAY: an empty name in {text!r} (write e.g. twilio,http)")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"DISPATCH_GATEWAY: {', '.join(repeated)} listed twice in {text!r}")
    return tuple(n for n in names if n)


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    """Seconds from a number (``1800``) or a duration (``30m``, ``72h``, ``3d``); more than 0."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = parse_duration(raw).total_seconds()
        except ValueError as exc:
            raise ConfigError(f"{name}: expected seconds or a duration such as 30m or 72h, got {raw!r}") from exc
    if seconds <= 0:
        raise ConfigError(f"{name}: must be more than 0, got {raw!r}")
    return seconds


def _dlr_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """When rows without a final delivery report are chased, and when they are given up as unconfirmed."""
    chase_after = _duration(env, "DISPATCH_DLR_CHASE_AFTER", 1800.0)
    deadline = _duration(env, "DISPATCH_DLR_DEADLINE", 72 * 3600.0)
    if deadline < chase_after:
        raise ConfigError(
            f"DISPATCH_DLR_DEADLINE ({deadline:g}s) must not be shorter than "
            f"DISPATCH_DLR_CHASE_AFTER ({chase_after:g}s)"
        )
    return {
        "dlr_chase_after": chase_after,
        "dlr_deadline": deadline,
        "dlr_every": _duration(env, "DISPATCH_DLR_EVERY", 60.0),
    }


def _schedule_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Scheduler, clock, send-window, frequency-cap and rate-limit settings (validated here, once)."""
    offset = 0.0
    if env.get("DISPATCH_FAKE_NOW"):
        raw = env["DISPATCH_FAKE_NOW"]
        try:
            fake = datetime.fromisoformat(raw)
        except ValueError as exc:
            raise ConfigError(
                f"DISPATCH_FAKE_NOW: expected an ISO date-time such as 2023-04-01T22:00+08:00, got {raw!r}"
            ) from exc
        if fake.tzinfo is None:
            raise ConfigError(f"DISPATCH_FAKE_NOW: give a UTC offset (e.g. +08:00), got {raw!r}")
        offset = (fake - datetime.now(UTC)).total_seconds()
    elif env.get("DISPATCH_CLOCK_OFFSET"):
        raw = env["DISPATCH_CLOCK_OFFSET"]
        try:
            offset = float(raw)
        except ValueError as exc:
            raise ConfigError(f"DISPATCH_CLOCK_OFFSET: expected seconds, got {raw!r}") from exc
    rate_raw = env.get("DISPATCH_RATE_LIMIT") or "0"
    try:
        rate = float(rate_raw)
    except ValueError as exc:
        raise ConfigError(f"DISPATCH_RATE_LIMIT: expected messages per second, got {rate_raw!r}") from exc
    if rate < 0:
        raise ConfigError(f"DISPATCH_RATE_LIMIT: must be 0 (unlimited) or more, got {rate_raw!r}")
    unit = env.get("DISPATCH_RATE_UNIT") or "messages"
    if unit not in ("messages", "parts"):
        raise ConfigError(f"DISPATCH_RATE_UNIT: expected messages or parts, got {unit!r}")
    period = env.get("DISPATCH_FREQUENCY_CAP_PERIOD") or "7d"
    try:
        if parse_duration(period) <= timedelta(0):
            raise ValueError("the period must be longer than 0")
    except ValueError as exc:
        raise ConfigError(f"DISPATCH_FREQUENCY_CAP_PERIOD: {exc}") from exc
    cap_max = _int(env, "DISPATCH_FREQUENCY_CAP_MAX", 2)
    if cap_max < 0:
        raise ConfigError(f"DISPATCH_FREQUENCY_CAP_MAX: must be 0 or more, got {cap_max}")
    window = env.get("DISPATCH_SEND_WINDOW") or "enforce"
    if window not in ("enforce", "ignore"):
        raise ConfigError(f"DISPATCH_SEND_WINDOW: expected enforce or ignore, got {window!r}")
    return {
        "clock_offset": offset,
        "send_window_enforced": window == "enforce",
        "rate_limit": rate,
        "rate_unit": unit,
        "frequency_cap_max": cap_max,
        "frequency_cap_period": period,
        "window_recheck": _float(env, "DISPATCH_WINDOW_RECHECK", 300.0),
        "scheduler_lease": _float(env, "DISPATCH_SCHEDULER_LEASE", 10.0),
        "scheduler_tick": _float(env, "DISPATCH_SCHEDULER_TICK", 0.5),
        "urgent_threads": _int(env, "DISPATCH_URGENT_THREADS", 2),
    }
