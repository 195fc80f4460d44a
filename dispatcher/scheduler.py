"""The scheduler: fires each campaign's schedule, exactly once per fire time, from one leader.

APScheduler 3.x cannot share a job store between processes, so this module uses only
its *triggers* (cron, interval) to compute fire times and keeps all state in the
database:

- **One leader.** Every ``dispatch scheduler`` process tries to take a lease (Redis
  ``SET NX PX`` with renewal when there is a Redis, else a row in the database);
  only the holder fires. A leader that dies stops renewing and another takes over
  when the lease runs out.
- **Exactly once.** A fire creates a run keyed by (campaign, fire time), unique in the
  database, and is then recorded in ``schedule_fires`` (also unique). Two leaders
  overlapping (a paused process waking after its lease expired) collide on the key
  and the second creates nothing.
- **Catch-up.** The leader walks from the campaign's last recorded fire to now: each
  fire within ``misfire_grace`` is made up once; older ones are recorded ``skipped``
  with the reason. A campaign seen for the first time looks back only ``misfire_grace``.
- **Themes.** The run's template is the one of the quarter the *fire time* falls in,
  in the schedule's time zone (``LoadedCampaign.template_for``; with ``themes: plan``,
  that quarter of that year). A campaign of a plan fires only within the plan's period.
- **Clock.** Fire times are computed from ``Runtime.clock`` (tests and drills shift it);
  the lease uses real time, because it is about live processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from apscheduler.triggers.base import BaseTrigger

from . import alerting, metrics
from .approvals import NotApproved
from .campaigns import LoadedCampaign, campaign_files, check_paths, make_trigger, next_after, parse_duration
from .costs import over_budget
from .dlr import DeliveryReportSweep
from .errors import DispatchError, InputError
from .restores import due_restores, start_restore
from .runs import dry_run_totals, enqueue_batches, start_run
from .store import DuplicateRun, LeaseLost
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger("dispatcher.scheduler")

LEASE_NAME = "scheduler"
#: at most this many missed fires are walked per campaign per tick (a long outage catches up over ticks)
MAX_FIRES_PER_TICK = 500


# ------------------------------------------------------------------ leader lease


class Lease(Protocol):
    def hold(self) -> bool: ...

    def release(self) -> None: ...


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLease:
    """Leadership as a Redis key with a TTL: taken with SET NX PX, renewed only by its holder."""

    def __init__(self, client: Any, key: str, holder: str, seconds: float) -> None:
        self.client = client
        self.key = key
        self.holder = holder
        self.ms = int(seconds * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        import redis

        try:
            return bool(self._renew(keys=[self.key], args=[self.holder, self.ms]))
        except redis.RedisError as exc:
            log.warning("scheduler.lease_unreachable", error=str(exc))
            return False

    def release(self) -> None:
        import redis

        with contextlib.suppress(redis.RedisError):  # else the lease runs out by itself
            self._release(keys=[self.key], args=[self.holder])


class DatabaseLease:
    """Leadership as a row in the delivery log, for set-ups without Redis (embedded, or RabbitMQ alone)."""

    def __init__(self, runtime: Runtime, holder: str, seconds: float) -> None:
        self.runtime = runtime
        self.holder = holder
        self.seconds = seconds

    def hold(self) -> bool:
        try:
            return self.runtime.store.coordination.acquire_lease(LEASE_NAME, self.holder, self.seconds)
        except DispatchError as exc:
            log.warning("scheduler.lease_unreachable", error=str(exc))
            return False

    def release(self) -> None:
        with contextlib.suppress(DispatchError):  # else the lease runs out by itself
            self.runtime.store.coordination.release_lease(LEASE_NAME, self.holder)


def make_lease(runtime: Runtime, holder: str) -> Lease:
    """Redis when there is one (the Redis broker, or DISPATCH_REDIS_URL beside RabbitMQ); else the database.

    RabbitMQ has no expiring key to hold a lease with, and its exclusive queues die with the connection
    that holds them, which pika lets lapse between heartbeats in a busy tick; the database lease
    needs nothing more than the delivery log every scheduler already writes to.
    """
    settings = runtime.settings
    url = settings.coordination_redis_url
    if not url:
        return DatabaseLease(runtime, holder, settings.scheduler_lease)
    import redis

    client = redis.Redis.from_url(url)
    key = f"{settings.broker_namespace}:scheduler:leader"
    return RedisLease(client, key, holder, settings.scheduler_lease)


# ------------------------------------------------------------------ the scheduler


@dataclass
class Entry:
    loaded: LoadedCampaign
    trigger: BaseTrigger
    grace: timedelta


class Scheduler:
    """Loads the campaigns with a schedule and, while leader, fires what is due."""

    def __init__(
        self, runtime: Runtime, campaigns_dir: Path, *, holder: str | None = None, lease: Lease | None = None
    ) -> None:
        self.runtime = runtime
        self.campaigns_dir = campaigns_dir
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease = lease or make_lease(runtime, self.holder)
        self.entries: dict[Path, Entry] = {}
        self.is_leader = False
        #: this leader's fencing token (leader_fences); None while it has not taken the fence
        self.token: int | None = None
        self.watchdog = Watchdog(runtime)
        #: one pass over the alerts at a time in this process (the tick and the alert loop both fire steps)
        self._alerts_lock = threading.Lock()
        #: chases delivery reports that never came, beside (not inside) the watchdog
        self.reports_sweep = DeliveryReportSweep(runtime)
        self._signature: tuple[Any, ...] = ()

    # ---- campaign files

    def _files_signature(self) -> tuple[Any, ...]:
        """The campaign files and the templates, by size and time: an edited template is a new
        campaign version (which needs its own approval), so it is re-read like a campaign."""
        items = []
        templates_dir = self.runtime.settings.templates_dir
        templates = sorted(p for p in templates_dir.rglob("*") if p.is_file()) if templates_dir.is_dir() else []
        for path in [*campaign_files([self.campaigns_dir]), *templates]:
            try:
                st = path.stat()
            except OSError:
                continue
            items.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(items)

    def load(self, *, strict: bool) -> None:
        """(Re-)read the campaign files. At start (``strict``) the first error is raised (exit 2);
        on a reload a broken file is logged and its previous version kept, so a typo does not
        silently unschedule a quarterly campaign."""
        self._signature = self._files_signature()
        loaded, errors = check_paths(
            [self.campaigns_dir],
            self.runtime.settings.templates_dir,
            self.runtime.clock(),
            gateways=self.runtime.known_gateways(),
            plans=self.runtime.plans(),
        )
        if errors and strict:
            raise errors[0]
        entries: dict[Path, Entry] = {}
        for lc in loaded:
            schedule = lc.schedule  # a campaign of a plan never fires outside the plan's period
            if schedule is None:
                continue
            entries[lc.path] = Entry(lc, make_trigger(schedule), parse_duration(schedule.misfire_grace))
        for error in errors:
            log.error("scheduler.campaign_invalid", error=str(error))
            path = Path(error.path) if isinstance(error, InputError) and error.path else None
            if path is not None and path in self.entries and path.exists():
                entries[path] = self.entries[path]
        self.entries = entries
        log.info("scheduler.loaded", campaigns=sorted(e.loaded.campaign.id for e in entries.values()))

    def reload_if_changed(self) -> None:
        if self._files_signature() != self._signature:
            self.load(strict=False)

    # ---- firing

    def tick(self) -> int:
        """One pass: hold (or try to take) the lease; as leader, fire what is due. Returns fires made."""
        leader = self.lease.hold()
        self._change_leadership(leader)
        if not leader:
            return 0
        if self.token is None:
            try:
                self.token = self.runtime.store.coordination.take_fence(LEASE_NAME, self.holder)
            except DispatchError as exc:
                # a frozen former leader may still hold the fence row: try again next tick
                log.warning("scheduler.fence_unavailable", error=str(exc))
                return 0
            log.info("scheduler.fenced", fence=self.token)
        # early-warning steps first: a resident in contact with a fraudster does not wait for campaign fires
        self.fire_alert_steps()
        fired = 0
        for entry in list(self.entries.values()):
            try:
                fired += self.fire_due(entry)
            except LeaseLost as exc:
                log.warning("scheduler.lease_lost", error=str(exc))
                self._change_leadership(False)
                return fired
            except DispatchError as exc:
                log.error("scheduler.fire_failed", campaign_id=entry.loaded.campaign.id, error=str(exc))
        self.restore_ended_ringback_windows()
        self.watchdog.tick(leading=self.lease.hold)  # a long pass must not outlive this scheduler's lead
        self.reports_sweep.tick()
        return fired

    def _change_leadership(self, leader: bool) -> None:
        """Record whether this process leads; a change is logged, and a new term takes a new fence.

        A leader that finds its lease gone mid-pass (frozen past it, another took over) says so here
        too: on-call reads leadership from these lines, and one left saying "leader" would show two.
        """
        metrics.leadership(leader)
        if leader != self.is_leader:
            log.info("scheduler.leader" if leader else "scheduler.follower", holder=self.holder)
            self.is_leader = leader
            self.token = None

    def fire_alert_steps(self) -> None:
        """As leader, record what alerts' runs did and fire the escalation steps now due (each exactly once:
        a step is taken with a conditional UPDATE in the transaction that creates its run)."""
        if not self._alerts_lock.acquire(blocking=False):
            return  # the other loop of this process is at it
        try:
            alerting.tick(self.runtime, actor=f"scheduler:{self.holder}")
        except DispatchError as exc:
            log.error("scheduler.alerts_failed", error=str(exc))
        finally:
            self._alerts_lock.release()

    def _alert_loop(self, stop: threading.Event) -> None:
        """Escalation steps on their own beat: a long watchdog or report sweep in ``tick`` never delays one."""
        while not stop.wait(self.runtime.settings.scheduler_tick):
            if self.is_leader and self.token is not None:
                self.fire_alert_steps()

    #: monotonic time of the next ringback sweep (the leader sweeps every RINGBACK_SWEEP_SECONDS)
    _ringback_due_at: float = 0.0
    RINGBACK_SWEEP_SECONDS = 30.0

    def restore_ended_ringback_windows(self) -> int:
        """As leader, start the restore of every ringback enrolment whose window has ended.

        Callers must hear a normal ring again once a campaign's window closes, whether or not an
        operator remembers ``dispatch ringback sweep``; ``start_restore`` is idempotent, so a sweep
        repeated by a new leader creates nothing twice.
        """
        if time.monotonic() < self._ringback_due_at:
            return 0
        self._ringback_due_at = time.monotonic() + self.RINGBACK_SWEEP_SECONDS
        started = 0
        try:
            for run_id in due_restores(self.runtime):
                start_restore(self.runtime, run_id, actor="scheduler")
                started += 1
        except DispatchError as exc:
            log.error("scheduler.ringback_sweep_failed", error=str(exc))
        if started:
            log.info("scheduler.ringback_restores_started", count=started)
        return started

    def fire_due(self, entry: Entry) -> int:
        store = self.runtime.store
        campaign_id = entry.loaded.campaign.id
        now = self.runtime.clock().astimezone(UTC)
        cursor = store.coordination.last_fire(campaign_id) or self._first_cursor(entry, now)
        fired = 0
        for _ in range(MAX_FIRES_PER_TICK):
            fire_time = next_after(entry.trigger, cursor)
            if fire_time is None or fire_time > now:
                break
            late = now - fire_time
            if late > entry.grace:
                reason = f"missed by {_human(late)}, beyond misfire_grace {_human(entry.grace)}"
                store.coordination.record_fire(
                    campaign_id, fire_time, "skipped", scheduler=self.holder, reason=reason, lease_token=self.token
                )
                log.warning("scheduler.fire_skipped", fire_time=fire_time, reason=reason)
                metrics.missed_fire(campaign_id)
            elif self.fire(entry, fire_time) is not None:
                fired += 1
            cursor = fire_time
        return fired

    @staticmethod
    def _first_cursor(entry: Entry, now: datetime) -> datetime:
        """Where a campaign with no recorded fire starts: just before its latest fire within the grace.

        Nothing was missed for a campaign never seen before, so only its most recent due fire
        (a deployment a few minutes after a quarterly fire) is made up, not every interval of the hour.
        """
        latest = None
        current = now - entry.grace
        for _ in range(100_000):
            nxt = next_after(entry.trigger, current)
            if nxt is None or nxt > now:
                break
            latest = current = nxt
        return latest - timedelta(microseconds=1) if latest is not None else now

    def fire(self, entry: Entry, fire_time: datetime) -> str | None:
        """Create the run of one fire (or find the one a previous leader created) and record the fire."""
        store = self.runtime.store
        campaign_id = entry.loaded.campaign.id
        bound = {"campaign_id": campaign_id, "fire_time": fire_time.isoformat()}
        with structlog.contextvars.bound_contextvars(**bound):
            # re-check the lease right before firing (a leader frozen since its last tick may have lost
            # it); the fencing token is checked again inside the transaction that creates the run
            if not self.lease.hold():
                raise LeaseLost(f"scheduler {self.holder} lost its lease before firing")
            log.info("scheduler.firing", fence=self.token)
            over = self._over_budget(entry, fire_time)
            if over and store.coordination.run_for_fire(campaign_id, fire_time) is None:
                # a fire over its budget creates no run: it is recorded as skipped, with why
                log.warning("scheduler.over_budget", reason=over)
                store.coordination.record_fire(
                    campaign_id, fire_time, "skipped", scheduler=self.holder, reason=over, lease_token=self.token
                )
                return None
            try:
                actor = f"scheduler:{self.holder}"
                fence = (LEASE_NAME, self.holder, self.token) if self.token is not None else None
                created = start_run(self.runtime, entry.loaded, fire_time=fire_time, actor=actor, fence=fence)
                run_id: str | None = created.run_id
                late = (self.runtime.clock() - fire_time).total_seconds()
                log.info("scheduler.fired", run_id=run_id, late_s=round(late, 3))
            except NotApproved as exc:
                # never silently: the fire is on record as skipped, with the line an operator acts on
                reason = f"not_approved: {exc.message}"
                store.coordination.record_fire(
                    campaign_id, fire_time, "skipped", scheduler=self.holder, reason=reason, lease_token=self.token
                )
                log.warning("scheduler.fire_skipped", reason=reason)
                metrics.missed_fire(campaign_id)
                return None
            except DuplicateRun:
                run_id = store.coordination.run_for_fire(campaign_id, fire_time)
                if run_id and not store.coordination.fire_recorded(campaign_id, fire_time):
                    # a leader died between creating the run and recording the fire: its batches may
                    # never have been enqueued. Enqueueing again is harmless (claims are atomic).
                    enqueue_batches(self.runtime, run_id, store.pending_batches(run_id))
                log.info("scheduler.duplicate_fire", run_id=run_id)
            store.coordination.record_fire(
                campaign_id, fire_time, "fired", scheduler=self.holder, run_id=run_id, lease_token=self.token
            )
            metrics.fired(campaign_id)
        return run_id

    def _over_budget(self, entry: Entry, fire_time: datetime) -> str | None:
        """Why this fire would cost more than the campaign's budget (None: within it, or no budget)."""
        if entry.loaded.campaign.budget is None:
            return None
        totals = dry_run_totals(self.runtime, entry.loaded, fire_time)
        return over_budget(entry.loaded.campaign.budget, totals.parts, totals.price_per_part)

    # ---- the process

    def serve(self, stop: threading.Event | None = None) -> None:
        """Tick until SIGTERM/SIGINT; SIGHUP (or a changed file) re-reads the campaigns."""
        stop = stop or threading.Event()
        reload = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGHUP, lambda *_: reload.set())
        log.info("scheduler.started", holder=self.holder, lease_s=self.runtime.settings.scheduler_lease)
        threading.Thread(target=self._alert_loop, args=(stop,), name="alert-steps", daemon=True).start()
        try:
            while True:
                if reload.is_set():
                    reload.clear()
                    self.load(strict=False)
                else:
                    self.reload_if_changed()
                self.tick()
                if stop.wait(self.runtime.settings.scheduler_tick):
                    break
        finally:
            self.lease.release()
            log.info("scheduler.stopped", holder=self.holder)


def _human(delta: timedelta) -> str:
    """``3d4h``, ``2h5m``, ``40s``: precise enough for a skip reason."""
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "".join(parts[:2]) or "0s"
