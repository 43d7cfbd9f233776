"""Wires ledger_svc from Settings: store, cache, use cases, outbox relay, jobs, gRPC server.

The one place dependencies are built, so tests start the very same thing on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from ledger_svc import codec, metrics
from ledger_svc.cache import RedisBalanceCache
from ledger_svc.fraud_client import FraudScreenerClient
from ledger_svc.ingest_worker import IngestWorker
from ledger_svc.outbox import OutboxRelay, RelayLeases
from ledger_svc.postings import Policy
from ledger_svc.reconcile import reconcile
from ledger_svc.rules_client import RulesEngineClient
from ledger_svc.screening import FraudScreen, ObservationBacklog, UnavailablePolicy, Verdict
from ledger_svc.server import LedgerServicer
from ledger_svc.service import LedgerService
from ledger_svc.store.base import LedgerStore
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh import clients
from pointmesh.clock import Clock, SystemClock
from pointmesh.config import Settings
from pointmesh.consumers import consumer_name
from pointmesh.events import TOPICS, EventBus, dead_letter_topic, open_bus
from pointmesh.redis_client import open_redis
from pointmesh.rpc import GrpcServer
from pointmesh.telemetry import RECONCILE_DIFFERENCES, RECONCILE_RUNS
from pointmesh.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
PURGE_EVERY = timedelta(hours=6)
# A failed retention or archive pass is tried again after this, doubling up to PURGE_EVERY:
# not every maintenance interval (seconds), which would repeat a failing pass back to back.
RETRY_FIRST = timedelta(minutes=1)


@dataclass
class Periodic:
    """When a periodic job is next due: `every` after a success, a growing backoff after a failure."""

    last: datetime
    every: timedelta
    failures: int = 0
    next_at: datetime | None = None

    def due(self, now: datetime) -> bool:
        return now >= (self.next_at or self.last + self.every)

    def succeeded(self, now: datetime) -> None:
        self.last, self.failures, self.next_at = now, 0, None

    def failed(self, now: datetime) -> timedelta:
        """Schedules the retry and returns how long until it."""
        self.failures += 1
        wait: timedelta = min(self.every, RETRY_FIRST * (1 << min(self.failures - 1, 20)))
        self.next_at = now + wait
        return wait


def policy_from(settings: Settings) -> Policy:
    return Policy(
        units=settings.units,
        expiry_days=settings.expiry_days,
        hold_timeout=timedelta(seconds=settings.hold_timeout_seconds),
        hold_max_timeout=timedelta(seconds=settings.hold_max_timeout_seconds),
        negative_limit_points=settings.negative_limit_points,
        key_retention=timedelta(days=settings.idempotency_retention_days),
    )


# How long a new connection of the fraud observation backlog's client may take to connect (build).
BACKLOG_CONNECT_SECONDS = 2.0


def fraud_screen(settings: Settings, client: FraudScreenerClient, redis: Redis | None = None) -> FraudScreen:
    policy = UnavailablePolicy(
        purchase=Verdict(settings.fraud_unavailable_purchase.upper()),
        redemption=Verdict(settings.fraud_unavailable_redemption.upper()),
        large_redemption=Verdict(settings.fraud_unavailable_large_redemption.upper()),
        large_redeem_points=settings.fraud_large_redemption_points,
    )
    return FraudScreen(client, policy, ObservationBacklog(redis) if redis is not None else None)


def sqlite_dir(settings: Settings) -> Path:
    """Where the embedded store keeps its shard files."""
    return settings.data_dir / "ledger"


def open_store(settings: Settings) -> LedgerStore:
    if settings.store == "cassandra":
        from ledger_svc.store.cassandra import open_cassandra_store

        return open_cassandra_store(settings)
    return SqliteLedgerStore(
        sqlite_dir(settings),
        settings.ledger_shards,
        settings.sqlite_synchronous,
        group_window=settings.sqlite_group_window_ms / 1000,
    )


@dataclass
class LedgerApp:
    settings: Settings
    store: LedgerStore
    service: LedgerService
    server: GrpcServer
    relay: OutboxRelay
    bus: EventBus
    redis: Redis
    cache: RedisBalanceCache
    clock: Clock
    backlog_redis: Redis | None = None  # the fraud observation backlog's own client
    stubs: tuple[object, ...] = ()  # clients of rules_svc and fraud_svc, whose channels close last
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> int:
        await self.bus.ensure_topics([*TOPICS, *(dead_letter_topic(t) for t in TOPICS)])
        await self.service.recover_sagas(at_startup=True)
        port = await self.server.start()
        self.tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        self.tasks.append(asyncio.create_task(self._jobs(), name="ledger-jobs"))
        if self.settings.reconcile_interval_seconds > 0:
            self.tasks.append(asyncio.create_task(self._reconcile_loop(), name="ledger-reconcile"))
        if self.settings.ingest_consumer:
            worker = IngestWorker(
                self.service, self.bus, consumer_name("ledger", self.settings.data_dir, self.settings.ledger_addr)
            )
            self.tasks.append(asyncio.create_task(worker.run(), name="ingest-worker"))
        return port

    async def _jobs(self) -> None:
        """Expiry, pending release, hold timeouts and saga recovery, then key retention and
        archiving now and then, each in its own try: one failing must not stop the others."""
        retention = timedelta(days=self.settings.idempotency_retention_days)
        purge, archive = Periodic(self.clock.now(), PURGE_EVERY), Periodic(self.clock.now(), PURGE_EVERY)
        while True:
            await asyncio.sleep(self.settings.maintenance_interval_seconds)
            try:
                report = await self.service.run_maintenance()
                if (
                    report.holds_voided
                    or report.lots_expired
                    or report.pending_released
                    or report.sagas_completed
                    or report.purchases_settled
                ):
                    log.info("maintenance pass", extra={"report": codec.to_plain(report)})
            except Exception:
                log.exception("maintenance pass failed; retrying next interval")
            if purge.due(self.clock.now()):
                try:
                    await self.service.purge_expired_keys(retention)
                    purge.succeeded(self.clock.now())
                except Exception:
                    wait = purge.failed(self.clock.now())
                    log.exception("key retention pass failed; retrying in %s", wait)
            if archive.due(self.clock.now()):
                try:
                    horizon = self.clock.now() - timedelta(days=self.settings.live_history_days)
                    moved = await self.store.archive(horizon)
                    if moved:
                        log.info("archived %d settled rows older than %s", moved, horizon.date())
                    archive.succeeded(self.clock.now())
                except Exception:
                    wait = archive.failed(self.clock.now())
                    log.exception("archive pass failed; retrying in %s", wait)

    async def _reconcile_loop(self) -> None:
        """The books proved now and then in the background; holds past their timeout that the
        timers missed are voided here, everything else found is logged and exported."""
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_seconds)
            try:
                report = await reconcile(self.store, self.clock.now())
                voided = 0
                for shard, hold_id in report.overdue_holds:
                    voided += await self.service.void_overdue_hold(shard, hold_id)
                unresolved = len(report.differences) - voided
                RECONCILE_DIFFERENCES.set(unresolved)
                RECONCILE_RUNS.inc()
                for name, total in report.totals_by_account_class.items():
                    if name.startswith("member:"):
                        metrics.POINTS_OUTSTANDING.labels(name.removeprefix("member:")).set(total)
                metrics.HOLDS_PENDING_POINTS.set(report.held_points)
                if voided:
                    log.warning("reconcile: voided %d holds past their timeout the timers missed", voided)
                for diff in report.differences:
                    log.warning("reconcile: %s", diff.describe())
                for note in report.unchecked:
                    log.info("reconcile: %s", note)
            except Exception:
                log.exception("reconcile pass failed; retrying next interval")

    async def _cleanup(self) -> None:
        self.relay.stop()
        for task in self.tasks:
            task.cancel()
        _done, stuck = await asyncio.wait(self.tasks, timeout=5)
        for task in stuck:
            log.error("background task %s did not stop within 5 s", task.get_name())
        # A last relay pass so events committed during the drain are not left waiting.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.relay.relay_once(), timeout=2)
        if self.relay.leases is not None:  # another replica relays those shards at once, not in 10 s
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.relay.leases.release_all(self.store.shard_count), timeout=2)
        await self.store.close()
        await self.bus.close()
        await self.redis.aclose()
        if self.backlog_redis is not None:
            await self.backlog_redis.aclose()
        for stub in self.stubs:
            await clients.close(stub)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


async def build(settings: Settings, *, clock: Clock | None = None, address: str | None = None) -> LedgerApp:
    clock = clock or SystemClock()
    store = open_store(settings)
    # No client-side retries: the cache fails fast to the store (its wait for a free connection
    # too) and the relay has its own backoff. Observations kept for a fraud_svc that is away have
    # no fallback: they get a client of their own that waits for a free connection and gives a
    # new one's TCP connect BACKLOG_CONNECT_SECONDS, so neither a peak of balance reads nor one
    # of their own loses them (300 screenings at once on a loaded box connected slower than the
    # tests' 0.3 s, and lost up to 64 observations). A Redis that drops packets while fraud_svc
    # is away holds a screened request that long, not longer.
    timeout = settings.redis_timeout_seconds
    redis = open_redis(settings.redis_url, timeout=timeout, connect_timeout=timeout, wait=timeout)
    backlog = (
        open_redis(settings.redis_url, timeout=timeout, connect_timeout=max(timeout, BACKLOG_CONNECT_SECONDS))
        if settings.fraud_screening
        else None
    )
    cache = RedisBalanceCache(redis, ttl_seconds=settings.cache_ttl_seconds, shared=store.shared_by_replicas)
    engine = RulesEngineClient(settings.rules_addr, settings.rules_deadline_seconds, settings.batch_deadline_seconds)
    fraud = (
        FraudScreenerClient(settings.fraud_addr, settings.fraud_deadline_seconds, settings.batch_deadline_seconds)
        if settings.fraud_screening
        else None
    )
    service = LedgerService(
        store,
        clock,
        policy_from(settings),
        card_secret=settings.card_hmac_secret,
        cache=cache,
        fault_point=settings.fault_point,
        engine=engine,
        program=settings.program,
        fraud=fraud_screen(settings, fraud, backlog) if fraud is not None else None,
    )
    # Its own Redis client: blocking stream reads outlast the cache client's short timeouts.
    bus = open_bus(settings)
    relay = OutboxRelay(
        store, bus, clock, service.outbox_wakeup, cache=cache, poll_seconds=settings.outbox_poll_seconds,
        leases=RelayLeases(redis, f"{settings.cassandra_keyspace}.{settings.cassandra_ledger}")
        if store.shared_by_replicas else None,
    )  # fmt: skip
    server = GrpcServer("ledger", address or settings.ledger_addr, grace_seconds=settings.grace_seconds)
    servicer = LedgerServicer(service, bus)
    server.add_service(lambda s: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, s), SERVICE_NAME)
    stubs = (engine.stub,) if fraud is None else (engine.stub, fraud.stub)
    app = LedgerApp(settings, store, service, server, relay, bus, redis, cache, clock, backlog, stubs=stubs)
    server.on_stop(app._cleanup)
    return app


async def serve(settings: Settings) -> None:
    """Runs ledger_svc until SIGTERM/SIGINT, then drains and stops."""
    app = await build(settings)
    await app.start()
    await app.server.serve_until_signal()
