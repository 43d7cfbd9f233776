"""The Cassandra ledger's versioned CQL schema and `pointmesh ledger migrate`.

Migrations only ever add (tables, columns); each is recorded in `schema_migrations` once it
has run, so running migrate again is a no-op and a store refuses to open on a keyspace that is
behind the code (docs/cassandra.md has the data model and why each key is what it is).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cassandra import InvalidRequest, OperationTimedOut
from cassandra.cluster import NoHostAvailable

log = logging.getLogger(__name__)

# A schema change makes every node flush its schema tables; on a small busy cluster that takes
# longer than the driver's default request timeout.
SCHEMA_STATEMENT_TIMEOUT = 60.0

# (version, description, statements); `{ks}` is the keyspace.
MIGRATIONS: Sequence[tuple[int, str, Sequence[str]]] = (
    (
        1,
        "member books, owners, shard indexes, directory",
        (
            # One partition per member of a shard: statics guard the unit of work, rows hold
            # accounts, journal, lots, holds, idempotency records, outbox and the rest.
            """CREATE TABLE IF NOT EXISTS {ks}.book (
                 ledger text, p text, kind text, id text,
                 version bigint static, seq bigint static, unit_id text static,
                 body text,
                 PRIMARY KEY ((ledger, p), kind, id))""",
            # Which member partition holds an object addressed by id (transaction, hold, ...).
            """CREATE TABLE IF NOT EXISTS {ks}.owners (
                 ledger text, shard int, id text, p text,
                 PRIMARY KEY ((ledger, shard, id)))""",
            # Every partition of a shard (reconciliation, exports: full scans).
            """CREATE TABLE IF NOT EXISTS {ks}.shard_members (
                 ledger text, shard int, p text,
                 PRIMARY KEY ((ledger, shard), p))""",
            # Partitions that may hold rare open work: waiting purchases, open sagas ('due').
            """CREATE TABLE IF NOT EXISTS {ks}.shard_index (
                 ledger text, shard int, kind text, p text, at bigint,
                 PRIMARY KEY ((ledger, shard, kind), p))""",
            # Time-bucketed pointers to rows that need attention at a time: unsent events
            # ('outbox', by sequence) and timers ('lot' expiry, 'release' of pending credit,
            # 'hold' timeout). Readers walk buckets from a watermark instead of scanning members.
            """CREATE TABLE IF NOT EXISTS {ks}.queue (
                 ledger text, shard int, kind text, bucket bigint, at bigint, p text, id text, w bigint,
                 PRIMARY KEY ((ledger, shard, kind, bucket), at, p, id))""",
            # The buckets of each queue that may hold pointers, so readers visit only those.
            """CREATE TABLE IF NOT EXISTS {ks}.queue_buckets (
                 ledger text, shard int, kind text, bucket bigint, w bigint,
                 PRIMARY KEY ((ledger, shard, kind), bucket))""",
            """CREATE TABLE IF NOT EXISTS {ks}.meta (
                 ledger text, k text, v text,
                 PRIMARY KEY ((ledger), k))""",
            """CREATE TABLE IF NOT EXISTS {ks}.members (
                 ledger text, member_id text, status text, profile text, merged_into text, created_us bigint,
                 PRIMARY KEY ((ledger, member_id)))""",
            """CREATE TABLE IF NOT EXISTS {ks}.member_ext (
                 ledger text, member_id text, kind text, value text, alias boolean,
                 PRIMARY KEY ((ledger, member_id), kind, value))""",
            """CREATE TABLE IF NOT EXISTS {ks}.external_ids (
                 ledger text, kind text, value text, member_id text, alias boolean,
                 PRIMARY KEY ((ledger, kind, value)))""",
            """CREATE TABLE IF NOT EXISTS {ks}.merges (
                 ledger text, source text, target text,
                 PRIMARY KEY ((ledger), source))""",
            """CREATE TABLE IF NOT EXISTS {ks}.claims (
                 ledger text, namespace text, key text, operation text, fingerprint text, result text,
                 created_us bigint,
                 PRIMARY KEY ((ledger, namespace, key)))""",
            # Claims by day, so retention deletes them without a scan; the days themselves in one
            # small partition per ledger.
            """CREATE TABLE IF NOT EXISTS {ks}.claim_days (
                 ledger text, day int, created_us bigint, namespace text, key text,
                 PRIMARY KEY ((ledger, day), created_us, namespace, key))""",
            """CREATE TABLE IF NOT EXISTS {ks}.claim_day_list (
                 ledger text, day int,
                 PRIMARY KEY ((ledger), day))""",
        ),
    ),
    (
        2,
        "member history by month",
        (
            # Settled rows older than the live horizon, one partition per member and month, so a
            # member's live partition stays small however long they stay (docs/cassandra.md).
            """CREATE TABLE IF NOT EXISTS {ks}.book_history (
                 ledger text, p text, month int, kind text, id text, body text,
                 PRIMARY KEY ((ledger, p, month), kind, id))""",
            # The month an archived object (transaction, hold, purchase, review, lot) went to.
            "ALTER TABLE {ks}.owners ADD month int",
        ),
    ),
    (
        3,
        "purchase listings by shard, channel, store and time bucket",
        (
            # Settlement pages through one store's day: a slice of one partition per shard and
            # day instead of a scan of every member. store_id '' holds the whole channel's, by
            # hour (a busy channel's day on one shard would be a 100 MB partition). Rows point at
            # the member partition holding the purchase. Purchases stored before this migration
            # are listed by `pointmesh ledger backfill`, run once every process has this code.
            """CREATE TABLE IF NOT EXISTS {ks}.purchase_days (
                 ledger text, shard int, channel text, store_id text, bucket bigint, at bigint, id text,
                 p text,
                 PRIMARY KEY ((ledger, shard, channel, store_id, bucket), at, id))""",
        ),
    ),
    (
        4,
        "fraud reviews by shard, status and day",
        (
            # The fraud team's queue pages through one status's days from a cursor instead of
            # reading every member of the shard (a page of 50 M members was ~100 M queries).
            # Rows point at the member partition holding the review; one written before its
            # batch that never committed is skipped by readers, who read the review anyway for
            # its body. Reviews stored before this migration are listed by `pointmesh ledger
            # backfill`; until it has run on a shard, that shard's listing scans as before.
            """CREATE TABLE IF NOT EXISTS {ks}.review_days (
                 ledger text, shard int, status text, bucket bigint, at bigint, id text, p text,
                 PRIMARY KEY ((ledger, shard, status, bucket), at, id))""",
            # The days of each status that may hold reviews, so a page visits only those (an
            # open queue's decided days are forgotten once read empty).
            """CREATE TABLE IF NOT EXISTS {ks}.review_buckets (
                 ledger text, shard int, status text, bucket bigint, w bigint,
                 PRIMARY KEY ((ledger, shard, status), bucket))""",
        ),
    ),
)

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000


def listing_bucket(store_id: str, at_us: int) -> int:
    """A store's listing rows go in daily buckets, a whole channel's in hourly ones."""
    return at_us // (DAY_US if store_id else HOUR_US)


def review_bucket(at_us: int) -> int:
    """Reviews go in daily buckets: a shard's day of reviews is a few thousand small rows at
    most, and a status's list of days grows by one row a day."""
    return at_us // DAY_US


LATEST = MIGRATIONS[-1][0]
_KEYSPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def check_keyspace(name: str) -> str:
    if not _KEYSPACE_RE.match(name):
        raise ValueError(
            f"keyspace {name!r} must be lowercase letters, digits and _ (at most 48), starting with a letter"
        )
    return name


def replication_map(spec: str) -> dict[str, Any]:
    """`simple:3` or `dc1:3,dc2:3` (NetworkTopologyStrategy, the production choice)."""
    spec = spec.strip()
    if spec.startswith("simple:"):
        return {"class": "SimpleStrategy", "replication_factor": int(spec.split(":", 1)[1])}
    out: dict[str, Any] = {"class": "NetworkTopologyStrategy"}
    for part in spec.split(","):
        dc, _, factor = part.partition(":")
        if not dc or not factor.isdigit():
            raise ValueError(f"replication {spec!r}: expected simple:N or dc:N[,dc:N...]")
        out[dc.strip()] = int(factor)
    return out


def _cql_map(values: dict[str, Any]) -> str:
    return "{" + ", ".join(f"'{k}': " + (str(v) if isinstance(v, int) else f"'{v}'") for k, v in values.items()) + "}"


def applied_version(session: Any, keyspace: str) -> int:
    """The highest migration applied to `keyspace`, 0 when none (or no keyspace)."""
    ks = check_keyspace(keyspace)
    found = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s AND table_name = 'schema_migrations'",
        (ks,),
    ).one()
    if found is None:
        return 0
    rows = _settled(session, f"SELECT version FROM {ks}.schema_migrations")
    return max((row.version for row in rows), default=0)


def _settled(session: Any, statement: str, params: Any = None, *, wait_seconds: float = 180.0) -> Any:
    """Runs a schema statement (or a read or write of `schema_migrations`), retrying while the
    cluster is still settling. Two things happen on a busy cluster: a node the previous schema
    change has not reached yet answers "keyspace doesn't exist" / "unconfigured table" (the
    driver's wait for schema agreement can time out, and then gives up silently); and a node
    busy flushing the schema tables of every node answers late, so the request times out or the
    driver finds no host. Every statement here is safe to run twice (IF NOT EXISTS, an ADD whose
    "already exists" migrate accepts, an upsert keyed by version), so retrying is."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return session.execute(statement, params, timeout=SCHEMA_STATEMENT_TIMEOUT)
        except InvalidRequest as exc:
            unseen = "doesn't exist" in str(exc) or "unconfigured table" in str(exc)
            if not unseen or time.monotonic() > deadline:
                raise
            log.info("cassandra schema: not on every node yet, retrying: %s", exc)
        except (OperationTimedOut, NoHostAvailable) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("cassandra schema: the cluster answered late, retrying: %s", exc)
            # The timed-out change may still be under way: sent again to another coordinator
            # before it has spread, a CREATE TABLE could make a second table id.
            _agreed(session)
        time.sleep(0.5)


def _agreed(session: Any) -> None:
    try:
        session.cluster.control_connection.wait_for_schema_agreement(wait_time=SCHEMA_STATEMENT_TIMEOUT)
    except Exception as exc:  # only a wait: the retry says whether the cluster is back
        log.info("cassandra schema: no agreement yet: %s", exc)


def migrate(session: Any, keyspace: str, replication: str) -> list[int]:
    """Creates the keyspace if missing and applies the migrations it lacks; returns them."""
    ks = check_keyspace(keyspace)
    _settled(session, f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {_cql_map(replication_map(replication))}")
    _settled(
        session,
        f"CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (version int PRIMARY KEY, description text,"
        " applied_at timestamp)",
    )
    done = applied_version(session, ks)
    applied: list[int] = []
    for version, description, statements in MIGRATIONS:
        if version <= done:
            continue
        for statement in statements:
            try:
                _settled(session, statement.format(ks=ks))
            except InvalidRequest as exc:
                # An ADD that ran before a crash kept this migration from being recorded.
                if "ADD" not in statement or "already" not in str(exc):
                    raise
        _settled(
            session,
            f"INSERT INTO {ks}.schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
            (version, description, datetime.now(UTC)),
        )
        log.info("cassandra schema: applied migration %d (%s) to %s", version, description, ks)
        applied.append(version)
    return applied
