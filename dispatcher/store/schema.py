"""The delivery log's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

The database is the source of truth for what was sent: one ``deliveries`` row per
(run, recipient) with a unique idempotency key, moved through its states by
atomic conditional UPDATEs; Dramatiq messages only say "work on batch N of run R".
``SCHEMA_VERSION`` is stored in ``meta``; ``SqlStore.migrate`` creates or upgrades.
"""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    text,
)

SCHEMA_VERSION = 15

#: what upgrades a delivery log written by an older version, by the version it brings it to:
#: (table, column) pairs added with ALTER TABLE, since ``create_all`` leaves existing tables alone.
#: Each column is declared on its table below as well, so a new database gets it directly.
#: New tables (3: leader_fences; 4: sessions, login_throttle; 7: run_prices; 8: alerts, alert_steps,
#: alert_milestones, roster, api_keys; 9: campaign_approvals; 10: ledger_tails; 11: rate_schedules;
#: 13: batch_leases) need no entry: ``create_all`` adds them, but only when the version moves (a log at
#: this version is only read), hence a bump for each.
MIGRATIONS: dict[int, tuple[tuple[str, str], ...]] = {
    2: (("runs", "as_of"),),
    3: (("runs", "halted"), ("schedule_fires", "lease_token")),
    4: (("accounts", "disabled"),),
    6: (("attempts", "trace_purged_at"),),
    8: (("deliveries", "confirmed_at"),),
    9: (("runs", "version_sha256"), ("runs", "approved_by"), ("runs", "approved_at"), ("runs", "approval_exempt")),
    # per-batch ledger chains; the upgrade also trades events' (run_id, seq) uniqueness for the two
    # indexes below (SqlStore._upgrade_events_to_chains), which SQLite can only do by rebuilding the table
    10: (("events", "batch"), ("runs", "batch_chains")),
}
#: indexes an upgrade to that version creates on tables that already exist (``create_all`` leaves them alone)
INDEX_MIGRATIONS: dict[int, tuple[str, ...]] = {
    5: ("ix_deliveries_provider_id",),
    10: ("uq_events_chain_seq", "uq_events_main_seq"),
    12: ("ix_deliveries_run_state_batch",),
}
#: indexes an upgrade to that version drops, once the ones that replace them are made
DROPPED_INDEXES: dict[int, tuple[str, ...]] = {
    12: ("ix_deliveries_run_batch_state", "ix_deliveries_run_state"),
}
#: PostgreSQL only: what an upgrade to that version makes (in this order) and drops on ``deliveries``
POSTGRES_INDEX_MIGRATIONS: dict[int, tuple[str, ...]] = {
    14: ("uq_deliveries_resident_run", "uq_deliveries_unlisted_key"),
}
POSTGRES_DROPPED: dict[int, tuple[str, ...]] = {
    14: ("ix_deliveries_resident",),
    # version 14 made it; 15 finds a row by phone without it (``_rows.rows_of_phone``)
    15: ("ix_deliveries_key",),
}
#: the unique constraint on ``deliveries.key`` a log made before version 14 has (PostgreSQL's default name)
OLD_KEY_CONSTRAINT = "deliveries_key_key"

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for a log that grows
BigId = BigInteger().with_variant(Integer(), "sqlite")

#: an idempotency key (``<run>:<number>``), compared byte by byte on PostgreSQL. A key is an identifier,
#: not text to sort for people, and a unique index under the database's locale compares two keys with
#: strcoll (they share the run's prefix, so nearly every comparison reaches it): writing a run's keys cost
#: about 70 ms more per 50,000 rows. SQLite compares bytes already.
Key = String(64).with_variant(String(64, collation="C"), "postgresql")
#: (table, column) pairs of type ``Key`` that an upgrade to version 12 gives the "C" collation on PostgreSQL
KEY_COLUMNS = (("deliveries", "key"), ("events", "key"))

metadata = MetaData()

meta = Table(
    "dispatch_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

residents = Table(
    "residents",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("phone", String(20), nullable=False, unique=True),
    Column("name", String(64), nullable=False, default=""),
    Column("district", String(32), nullable=False),
    Column("grid", String(16), nullable=False, default=""),
    Column("language", String(16), nullable=False, default="zh-CN"),
    Column("opted_out", Boolean, nullable=False, default=False),
    Column("opted_out_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_residents_district_grid", "district", "grid"),
)

resident_segments = Table(
    "resident_segments",
    metadata,
    Column("resident_id", BigId, primary_key=True),
    Column("segment", String(32), primary_key=True),
    Index("ix_resident_segments_segment", "segment", "resident_id"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("campaign_id", String(64), nullable=False),
    Column("title", Text, nullable=False),
    Column("owner", String(32), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("priority", String(16), nullable=False, default="bulk"),
    Column("reason", Text),
    #: the scheduler's fire time; unique with campaign_id so a duplicate fire creates nothing
    Column("fire_time", DateTime(timezone=True)),
    #: the date a manual run was made as of (``dispatch run --as-of``): it chose the theme
    Column("as_of", DateTime(timezone=True)),
    Column("status", String(16), nullable=False),
    Column("gateway", String(32), nullable=False),
    Column("campaign_path", Text, nullable=False),
    Column("campaign_yaml", Text, nullable=False),
    Column("campaign_sha256", String(64), nullable=False),
    Column("template_name", Text, nullable=False),
    Column("template_text", Text, nullable=False),
    Column("template_sha256", String(64), nullable=False),
    Column("send_by", DateTime(timezone=True)),
    Column("batch_size", Integer, nullable=False),
    Column("batches", Integer, nullable=False, default=0),
    Column("total", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    #: tail of the run's ledger chain (store/ledger.py): last sequence number and its hash
    Column("ledger_seq", Integer),
    Column("ledger_hash", String(64)),
    #: how many per-batch ledger chains the run has (its head seals the same number); their tails are
    #: in ``ledger_tails``. NULL on runs made before batch chains: all their events are in the run's chain
    Column("batch_chains", Integer),
    #: why the run stopped by itself (its outbox or delivery log could not be written); cleared by resume
    Column("halted", Text),
    #: the campaign version (sha256 over the campaign file and every template it uses) the run was made of,
    #: and who approved that version and when; or why it needed no approval (a drill, an urgent send).
    #: NULL on runs made before approvals existed
    Column("version_sha256", String(64)),
    Column("approved_by", String(64)),
    Column("approved_at", DateTime(timezone=True)),
    Column("approval_exempt", Text),
    UniqueConstraint("campaign_id", "fire_time", name="uq_runs_campaign_fire"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(32), nullable=False),
    #: idempotency key: run + phone. No recipient can be written twice into a run: see the unique indexes
    #: below (SQLite: on the key; PostgreSQL: on the resident and run, and on the key of a number outside
    #: the registry)
    Column("key", Key, nullable=False),
    Column("resident_id", BigId, nullable=False),
    Column("phone", String(20), nullable=False),
    Column("district", String(32), nullable=False),
    Column("grid", String(16), nullable=False),
    Column("batch_no", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(64)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("gateway", String(32)),
    Column("provider_id", String(64)),
    Column("error_code", String(32)),
    Column("error_message", Text),
    Column("parts", Integer),
    Column("encoding", String(8)),
    Column("body", Text),
    Column("claim_token", String(40)),
    Column("claimed_by", String(64)),
    Column("claimed_at", DateTime(timezone=True)),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("sent_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    #: voice calls: when the listener pressed 1 to confirm they heard the warning (``delivery.confirmed``)
    Column("confirmed_at", DateTime(timezone=True)),
    # one index for a run's rows by state, then batch: a worker's claim (run, batch, pending), the rows a
    # dead worker left (run, sending), "is anything still open" after each batch (run, open states), the
    # pending batches a resume re-enqueues, and the counts by state. Two indexes served these, (run, batch,
    # state) and (run, state); every row written at fan-out and its result (state is indexed, so not a HOT
    # update) paid for both. A claim no longer updates the rows (batch_leases below)
    Index("ix_deliveries_run_state_batch", "run_id", "state", "batch_no"),
    # SQLite: the key, unique; and by resident (the frequency cap), not by phone: ids arrive in ascending
    # order at fan-out, so this index costs little to maintain, where a phone index (random order) doubled
    # the time of writing a 200,000-row run. A log made before version 14 has the key's uniqueness as a
    # constraint of the table instead, which is the same index
    Index("uq_deliveries_key", "key", unique=True).ddl_if(dialect="sqlite"),
    Index("ix_deliveries_resident", "resident_id").ddl_if(dialect="sqlite"),
    # PostgreSQL: no index over every key (a key is the run and the phone number, so a run's keys arrive
    # in random order). Version 14 traded the unique B-tree for a hash index, which still took a tenth of
    # writing a run's rows and of each result's UPDATE (every index of the row gets an entry, since
    # ``state`` is indexed); 15 dropped it. A run holds each resident at most once, in an index whose
    # resident ids arrive in ascending order at fan-out and which the frequency cap reads by resident; a
    # number outside the registry (resident 0: an alert's, a roster's) is held once by its key. The
    # registry has one resident per number, so together these keep every number to one row per run, as
    # the unique key did, and find a number's rows (``_rows.rows_of_phone``)
    Index(
        "uq_deliveries_resident_run", "resident_id", "run_id", unique=True, postgresql_where=text("resident_id <> 0")
    ).ddl_if(dialect="postgresql"),
    Index("uq_deliveries_unlisted_key", "key", unique=True, postgresql_where=text("resident_id = 0")).ddl_if(
        dialect="postgresql"
    ),
    # delivery reports (callbacks, and the sweep that asks for them) find their row by the provider's id;
    # partial, so the rows written at fan-out (no id yet) cost this index nothing
    Index(
        "ix_deliveries_provider_id",
        "provider_id",
        sqlite_where=text("provider_id IS NOT NULL"),
        postgresql_where=text("provider_id IS NOT NULL"),
    ),
)

#: PostgreSQL: how many ``deliveries`` ids a session takes from the sequence at once (14: an upgrade sets it).
#: Taking them one at a time cost 16 of the 450 ms that writing 100,000 rows took. A session's ids still
#: rise, so each run's rows (always written by one statement, in one session) are numbered in the order
#: they were selected, which is all that the digest of its keys and every walk over them assume; runs
#: written at once by two sessions may interleave, and ids unused when a session ends leave gaps
DELIVERY_ID_CACHE = 1000
SET_DELIVERY_ID_CACHE = (
    "DO $$ BEGIN EXECUTE 'ALTER SEQUENCE ' || pg_get_serial_sequence('deliveries', 'id') "
    f"|| ' CACHE {DELIVERY_ID_CACHE}'; END $$"
)
event.listen(deliveries, "after_create", DDL(SET_DELIVERY_ID_CACHE).execute_if(dialect="postgresql"))

#: a worker's hold on the rows of one batch while it sends them (store/_leases.py): one row per batch in
#: flight, in place of moving each of its rows to ``sending`` and back out. At most one per batch at a time
batch_leases = Table(
    "batch_leases",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("batch_no", Integer, primary_key=True),
    #: the claim's token: the holder's results, renewals and releases name it
    Column("token", String(40), nullable=False, unique=True),
    Column("claimed_by", String(64), nullable=False),
    #: when the lease was taken or last renewed; a takeover is fenced on the value it read
    Column("claimed_at", DateTime(timezone=True), nullable=False),
    #: the ids of the rows the lease holds, ascending, comma-separated (written once, read whole)
    Column("ids", Text, nullable=False),
)

#: the price per SMS part of each provider when the run was created (DISPATCH_PART_PRICES), in CNY:
#: spend is parts a provider accepted times the price recorded here, so changing a contract's price
#: later never reprices what was already sent. A table of its own, written with the run row.
run_prices = Table(
    "run_prices",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("gateway", String(32), primary_key=True),
    Column("price_per_part", Float, nullable=False),
)

#: every attempt to hand a message to a gateway, kept for auditors (one row per try)
attempts = Table(
    "attempts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("delivery_id", BigId, nullable=False),
    Column("run_id", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("gateway", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),  # sent, failed, retry, unknown, found
    Column("provider_id", String(64)),
    Column("error_code", String(32)),
    Column("error_message", Text),
    #: JSON list of redacted HTTP exchanges (adapters that speak HTTP fill it)
    Column("trace", Text),
    #: when the retention purge cleared ``trace`` (``dispatch purge``): the attempt row and its ledger
    #: event stay, only the exchange text goes; NULL while the trace is kept (or there never was one)
    Column("trace_purged_at", DateTime(timezone=True)),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_attempts_delivery", "delivery_id"),
    Index("ix_attempts_run", "run_id"),
)

#: the append-only, hash-chained ledger of every delivery state change (store/ledger.py)
events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(32), nullable=False),
    #: the chain within the run: NULL is the run's own chain (head, run-level events; every event of a run
    #: made before batch chains), a number the chain of that batch's deliveries (ledger.py)
    Column("batch", Integer),
    Column("seq", Integer, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("key", Key),
    Column("delivery_id", BigId),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("provider_id", String(64)),
    Column("error_code", String(32)),
    Column("reason", String(64)),
    Column("actor", String(128), nullable=False),
    Column("payload", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # one seq per chain: (run_id, batch, seq) for batch chains; NULLs never collide in a unique index,
    # so the run's own chain (and the side chains) get a partial one
    Index("uq_events_chain_seq", "run_id", "batch", "seq", unique=True),
    Index(
        "uq_events_main_seq",
        "run_id",
        "seq",
        unique=True,
        sqlite_where=text("batch IS NULL"),
        postgresql_where=text("batch IS NULL"),
    ),
    Index("ix_events_key", "key"),
    Index("ix_events_at", "at"),
)

#: tails of hash chains that do not belong to a run (the ``audit`` chain of unmasked exports);
#: a run's tail lives on its ``runs`` row instead
ledger_chains = Table(
    "ledger_chains",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("ledger_seq", Integer),
    Column("ledger_hash", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: the tail of each batch chain of a run (store/ledger.py): written with the run's head, one row per batch,
#: and locked (``FOR UPDATE``) only by appends to that batch, so workers recording different batches of one
#: run never wait on each other
ledger_tails = Table(
    "ledger_tails",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("batch", Integer, primary_key=True, autoincrement=False),
    Column("ledger_seq", Integer),
    Column("ledger_hash", String(64)),
)

#: dashboard accounts (dispatcher/accounts.py): role ``auditor`` or ``operator``, scrypt password hash
accounts = Table(
    "accounts",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    #: a disabled account keeps its name (and its place in the ledger's actors) but cannot log in;
    #: NULL (an account from before version 3) is enabled
    Column("disabled", Boolean, default=False),
)

#: dashboard sessions, server-side so that logout, a password or role change and ``users disable|remove``
#: end them at once. Only a sha256 of the cookie's random id is kept: a copy of the database holds no
#: usable session.
sessions = Table(
    "sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("account", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_sessions_account", "account"),
)

#: failed-login counters per account name (``name:...``) and per client address (``addr:...``), shared by
#: every web process; an attempt is counted here, atomically, before its password is checked
login_throttle = Table(
    "login_throttle",
    metadata,
    Column("key", String(160), primary_key=True),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("count", Integer, nullable=False),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(128), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)

#: every fire the scheduler handled: ``fired`` with its run, or ``skipped`` with the reason
#: (missed beyond the campaign's misfire_grace). Unique per (campaign, fire time) like ``runs``.
schedule_fires = Table(
    "schedule_fires",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("campaign_id", String(64), nullable=False),
    Column("fire_time", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),
    Column("run_id", String(32)),
    Column("reason", Text),
    Column("scheduler", String(128), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    #: the leader's fencing token when it fired: strictly increasing across changes of leader
    Column("lease_token", Integer),
    UniqueConstraint("campaign_id", "fire_time", name="uq_schedule_fires_campaign_fire"),
)

#: two-person approval of campaign versions (dispatcher/approvals.py): one operator submits a version, another
#: approves it. A row is live until an edit of the campaign or a template it uses makes another version current
#: (``voided_at``); at most one live row per campaign, so two submissions at once cannot both stand.
campaign_approvals = Table(
    "campaign_approvals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("campaign_id", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("campaign_path", Text, nullable=False),
    Column("submitted_by", String(64), nullable=False),
    Column("submitted_at", DateTime(timezone=True), nullable=False),
    Column("approved_by", String(64)),
    Column("approved_at", DateTime(timezone=True)),
    Column("voided_at", DateTime(timezone=True)),
    #: the version that was current when this one was voided
    Column("voided_by_version", String(64)),
    Index("ix_campaign_approvals_campaign", "campaign_id", "id"),
    Index(
        "uq_campaign_approvals_live",
        "campaign_id",
        unique=True,
        sqlite_where=text("voided_at IS NULL"),
        postgresql_where=text("voided_at IS NULL"),
    ),
)

#: the scheduler leader's fencing token, whatever holds the lease (Redis or the database): a new
#: leader bumps it, and a run is only created by a fire whose token is still the current one, in the
#: same transaction, so a leader that froze and woke after losing its lease cannot fire
leader_fences = Table(
    "leader_fences",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("token", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: the scheduler leader's lease when no Redis is configured (one row per lock name)
scheduler_leases = Table(
    "scheduler_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

#: the shared rate limiter's schedule when no Redis is configured (a RabbitMQ broker without
#: DISPATCH_REDIS_URL): one row per gateway holding the GCRA "theoretical arrival time" in
#: microseconds since the epoch, moved by one atomic upsert per send (``Coordination.reserve_slot``)
rate_schedules = Table(
    "rate_schedules",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("tat_us", BigInteger, nullable=False),
)

#: what a ringback enrolment changed on a number and must put back at the window's end:
#: for Twilio-hosted numbers the voice URL (and method) the number had before we pointed it at our TwiML
ringback_numbers = Table(
    "ringback_numbers",
    metadata,
    Column("run_id", String(32), primary_key=True),  # the enrol run
    Column("phone", String(20), primary_key=True),
    Column("provider_id", String(64)),
    Column("kept", Text),  # JSON: what restore needs (e.g. {"voice_url": ..., "voice_method": ...})
    Column("enrolled_at", DateTime(timezone=True), nullable=False),
)

#: provider status reports that arrived before the row held the provider's id: a callback can
#: overtake the batch that records the SIDs; kept here and applied once the row has its id
status_backlog = Table(
    "status_backlog",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("provider_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_code", String(32)),
    Column("actor", String(32), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Index("ix_status_backlog_provider", "provider_id"),
)

#: early-warning alerts (dispatcher/alerting.py): one resident to reach now, by SMS and call, escalated to
#: their grid until confirmed. ``external_id`` is the anti-fraud centre's id: unique, so a repeated alert
#: creates nothing. Each alert's events form their own hash chain (``alert:<id>`` in ``ledger_chains``).
alerts = Table(
    "alerts",
    metadata,
    Column("id", String(24), primary_key=True),
    Column("external_id", String(128), unique=True),
    Column("phone", String(20), nullable=False),
    Column("name", String(64), nullable=False, default=""),
    Column("fraud_type", String(32), nullable=False),
    Column("source", Text),
    #: from the registry when the number is in it; empty for an unknown number
    Column("district", String(32), nullable=False, default=""),
    Column("grid", String(16), nullable=False, default=""),
    Column("status", String(16), nullable=False),  # open, closed
    Column("outcome", String(32)),
    Column("note", Text),
    Column("actor", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    #: first time the resident was reached (an SMS delivered or a call answered)
    Column("first_contact_at", DateTime(timezone=True)),
    #: the resident pressed 1 on a call: the escalation stops
    Column("confirmed_at", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    Index("ix_alerts_status_created", "status", "created_at"),
)

#: an alert's escalation steps, due at a time; the scheduler's leader fires each with a conditional UPDATE
#: (state due -> fired) in the transaction that creates its run, so a step fires once and is never lost
alert_steps = Table(
    "alert_steps",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("alert_id", String(24), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("action", String(16), nullable=False),  # sms, call, notify_grid
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),  # due, fired, cancelled, skipped
    Column("run_id", String(32)),
    Column("fired_at", DateTime(timezone=True)),
    Column("fired_by", String(128)),
    Column("detail", Text),
    UniqueConstraint("alert_id", "seq", name="uq_alert_steps_alert_seq"),
    Index("ix_alert_steps_state_due", "state", "due_at"),
)

#: what an alert observed of its runs (sms sent/delivered, call answered, key pressed), once each:
#: the tick appends each milestone to the alert's chain when it first sees it
alert_milestones = Table(
    "alert_milestones",
    metadata,
    Column("alert_id", String(24), primary_key=True),
    Column("name", String(48), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
)

#: who is told when an alert goes unconfirmed: grid workers and the police grid's duty number, per grid
roster = Table(
    "roster",
    metadata,
    Column("grid", String(16), primary_key=True),
    Column("role", String(16), primary_key=True),  # grid_worker, police_duty
    Column("phone", String(20), primary_key=True),
    Column("name", String(64), nullable=False, default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: keys that may post alerts (``POST /api/alerts``): only a sha256 of the key is kept
api_keys = Table(
    "api_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)
