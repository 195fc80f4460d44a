"""Prometheus metrics: what is declared, and one helper per place that observes it.

The engineer on call reads send rates, error codes, queue depth and delivery-report lag
from here instead of SQL. Call sites stay one line (``metrics.batch_done(...)``); this
module imports nothing of the project, so every layer may call it.

Labels are bounded names only: gateways, outcomes, error codes, lanes, campaign ids,
delivery states. Never a phone number, a key, a provider id or a run id (one series per
run would grow without end).

Each process keeps its own counters in ``REGISTRY``: ``dispatch web`` serves them on
``/metrics``; ``dispatch worker`` and ``dispatch scheduler`` serve them on their own port
(``serve``, ``DISPATCH_METRICS_PORT``) because they are separate processes with their own
memory. Prometheus adds the processes' series up.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: this process's metrics (not prometheus_client's global registry, so nothing a library
#: registers there leaks into our scrape, and tests may build several apps in one process)
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

#: seconds; sends take milliseconds to a minute (a rate-limited 250-row batch), reports minutes to hours
_BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LAG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600, 72 * 3600)

MESSAGES = Counter(
    "dispatch_messages",
    "Delivery rows a batch recorded, by what happened to them",
    ["outcome", "gateway", "error_code", "lane", "campaign"],
    registry=REGISTRY,
)
PARTS = Counter(
    "dispatch_message_parts",
    "SMS parts handed to a gateway (what a carrier bills)",
    ["gateway", "lane", "campaign"],
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "dispatch_batch_duration_seconds",
    "Time a worker took for one batch that claimed rows: claim, render, send, record",
    ["lane", "channel"],
    buckets=_BATCH_BUCKETS,
    registry=REGISTRY,
)
RATE_WAIT = Histogram(
    "dispatch_rate_limiter_wait_seconds",
    "Time a send waited for its slot from the shared gateway rate limiter",
    buckets=_WAIT_BUCKETS,
    registry=REGISTRY,
)
REPORT_LAG = Histogram(
    "dispatch_delivery_report_lag_seconds",
    "Time from a message's hand-over (sent_at) to the delivery report that moved it",
    ["gateway", "status"],
    buckets=_LAG_BUCKETS,
    registry=REGISTRY,
)
SCHEDULER_LEADER = Gauge(
    "dispatch_scheduler_leader",
    "1 while this scheduler process holds the leader lease, else 0",
    registry=REGISTRY,
)
SCHEDULER_FIRES = Counter(
    "dispatch_scheduler_fires",
    "Schedule fires this leader made (a run created or found)",
    ["campaign"],
    registry=REGISTRY,
)
SCHEDULER_MISSED = Counter(
    "dispatch_scheduler_missed_fires",
    "Fires found later than their misfire_grace and recorded skipped",
    ["campaign"],
    registry=REGISTRY,
)
GATEWAY_FAILOVERS = Counter(
    "dispatch_gateway_failovers",
    "Messages a failover list moved on to its next provider (the one before took nothing, or its circuit was open)",
    ["from_gateway", "to_gateway"],
    registry=REGISTRY,
)
GATEWAY_CIRCUIT = Counter(
    "dispatch_gateway_circuit_changes",
    "A provider's circuit breaker opening (provider down), half-opening (probe) or closing, in this process",
    ["gateway", "state"],
    registry=REGISTRY,
)
GATEWAY_CIRCUIT_OPEN = Gauge(
    "dispatch_gateway_circuit_open",
    "1 while this process passes the provider over or probes it (circuit open or half-open), else 0",
    ["gateway"],
    registry=REGISTRY,
)


class RecordedOutcome(Protocol):
    """What a batch recorded for one row (``store.Outcome`` has these fields)."""

    @property
    def state(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def gateway(self) -> str: ...
    @property
    def error_code(self) -> str | None: ...
    @property
    def parts(self) -> int | None: ...


class ReportedChange(Protocol):
    """A delivery report's state change (``store.StateChange`` has these fields)."""

    @property
    def to_state(self) -> str: ...
    @property
    def gateway(self) -> str | None: ...
    @property
    def sent_at(self) -> datetime | None: ...
    @property
    def at(self) -> datetime | None: ...


def outcome_label(outcome: RecordedOutcome) -> str:
    """``sent``, ``failed``, ``skipped``, ``expired``, ``unknown`` or ``retry``.

    The delivery state a row ended in, except a row put back for another try (``retry``);
    a row skipped because ``send_by`` passed is ``expired`` like its state, so the final
    counters of a run match the delivery log's counts by state.
    """
    if outcome.state == "expired":
        return "expired"
    return outcome.outcome


def batch_done(outcomes: Sequence[RecordedOutcome], *, lane: str, campaign: str, channel: str, started: float) -> None:
    """Count a recorded batch's outcomes and parts and observe its duration (``started``: monotonic)."""
    BATCH_SECONDS.labels(lane, channel).observe(time.monotonic() - started)
    # summed per label set first: a batch's outcomes share a few label sets, and each increment of a
    # child counter takes its lock (and, in multiprocess mode, writes its file)
    messages: Tally[tuple[str, str, str]] = Tally()
    parts: Tally[str] = Tally()
    for o in outcomes:
        label = outcome_label(o)
        messages[(label, o.gateway or "", o.error_code or "")] += 1
        if channel == "sms" and label == "sent" and o.parts:
            parts[o.gateway or ""] += o.parts
    for (label, gateway, code), n in messages.items():
        MESSAGES.labels(label, gateway, code, lane, campaign).inc(n)
    for gateway, n in parts.items():
        PARTS.labels(gateway, lane, campaign).inc(n)


def rate_waited(seconds: float) -> None:
    RATE_WAIT.observe(max(0.0, seconds))


def reports_applied(changes: Iterable[ReportedChange]) -> None:
    """Observe the lag of every row a delivery report moved that had been handed over."""
    for change in changes:
        if change.sent_at is None or change.at is None:
            continue
        lag = (change.at - change.sent_at).total_seconds()
        REPORT_LAG.labels(change.gateway or "", change.to_state).observe(max(0.0, lag))


def failed_over(from_gateway: str, to_gateway: str, messages: int) -> None:
    GATEWAY_FAILOVERS.labels(from_gateway, to_gateway).inc(messages)


def circuit_changed(gateway: str, state: str) -> None:
    GATEWAY_CIRCUIT.labels(gateway, state).inc()
    GATEWAY_CIRCUIT_OPEN.labels(gateway).set(0 if state == "closed" else 1)


def leadership(leader: bool) -> None:
    SCHEDULER_LEADER.set(1 if leader else 0)


def fired(campaign: str) -> None:
    SCHEDULER_FIRES.labels(campaign).inc()


def missed_fire(campaign: str) -> None:
    SCHEDULER_MISSED.labels(campaign).inc()


class QueueDepth(Collector):
    """``dispatch_queue_messages{lane, state}``, read from the broker at scrape time.

    ``read`` returns ``{lane: {state: count}}``; nothing is kept between scrapes, so the
    figure is the broker's, not this process's guess. A broker that cannot be read gives
    ``dispatch_queue_up 0`` instead of a failed scrape.
    """

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("dispatch_queue_up", "1 when the broker's queues could be read at this scrape")
        depth = GaugeMetricFamily(
            "dispatch_queue_messages",
            "Messages (batches) in the broker per lane: ready, delayed (retries, deferred windows), in progress",
            labels=["lane", "state"],
        )
        try:
            lanes = self.read()
        except Exception:  # a scrape must answer even while Redis is away: that is when it matters
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for lane, states in sorted(lanes.items()):
            for state, count in sorted(states.items()):
                depth.add_metric([lane, state], count)
        yield up
        yield depth


def scrape_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry serving this process's metrics plus collectors read at scrape time."""
    registry = CollectorRegistry()
    registry.register(REGISTRY)  # a registry is a collector too (it has collect())
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(registry: Any = REGISTRY) -> tuple[bytes, str]:
    """The text format body and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(host: str, port: int) -> Any:
    """Serve ``/metrics`` from a daemon thread of this process (workers, scheduler); returns the server."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
