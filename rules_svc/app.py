"""Wires rules_svc from Settings: version store, use cases, gRPC server, periodic reload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pointmesh import clients
from pointmesh.clients import ledger_stub, rules_stub
from pointmesh.clock import Clock, SystemClock
from pointmesh.config import Settings
from pointmesh.consumers import consumer_name
from pointmesh.events import LEDGER_EVENTS, dead_letter_topic, open_bus
from pointmesh.rpc import GrpcServer
from pointmesh.v1 import rules_pb2, rules_pb2_grpc
from rules_svc.domain import RulesError
from rules_svc.follower import DivergedFromLeader, FollowerServicer, LeaderMirror
from rules_svc.game_service import GameService
from rules_svc.game_store import GameStore
from rules_svc.game_worker import GameWorker
from rules_svc.server import RulesServicer
from rules_svc.service import RulesService
from rules_svc.versions import VersionStore

log = logging.getLogger(__name__)
SERVICE_NAME = rules_pb2.DESCRIPTOR.services_by_name["RulesService"].full_name
PROGRAMS_DIR = Path(__file__).parent / "programs"
# Seeded programs apply to receipts from any date, so a fresh install can take late receipts.
SEED_EFFECTIVE_FROM = datetime(2000, 1, 1, tzinfo=UTC)


def seed_text(spec: str) -> str:
    """`builtin:<name>` is a program shipped in rules_svc/programs; anything else is a path."""
    if spec.startswith("builtin:"):
        return (PROGRAMS_DIR / f"{spec.removeprefix('builtin:')}.yaml").read_text()
    return Path(spec).read_text()


@dataclass
class RulesApp:
    settings: Settings
    service: RulesService
    server: GrpcServer
    store: VersionStore
    game: GameService
    worker: GameWorker | None = None
    mirror: LeaderMirror | None = None  # set on a follower (rules_svc/follower.py)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    diverged: str = ""  # why a follower stopped serving: its versions contradict the leader's

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> int:
        await self.service.refresh()
        if self.mirror is not None:
            await self.mirror.pull_until_ready()
        else:
            await self._seed()
        port = await self.server.start()
        self.tasks.append(asyncio.create_task(self._reload(), name="rules-reload"))
        if self.worker is not None:
            await self.worker.bus.ensure_topics([LEDGER_EVENTS, dead_letter_topic(LEDGER_EVENTS)])
            self.tasks.append(asyncio.create_task(self.worker.run(self.stopping), name="gamification"))
        return port

    async def _seed(self) -> None:
        spec = self.settings.rules_seed_file
        if not spec:
            return
        text = seed_text(spec)
        key = "seed-" + hashlib.sha256(text.encode()).hexdigest()[:32]
        try:
            info = await self.service.publish(
                "rules-seed", key, text, "json" if spec.endswith(".json") else "yaml", SEED_EFFECTIVE_FROM,
                "seed", backdated=True, only_if_absent=True,
            )  # fmt: skip
        except RulesError as exc:
            # The seed only matters on a fresh install: with versions published, a broken seed
            # file must not keep the service (and every purchase) down.
            held = self.service.all_versions()
            if not any(i.program == self.settings.program for i in held):
                raise
            log.error("seed file %s does not validate and was not used (%s); serving the published versions",
                      spec, exc)  # fmt: skip
            return
        log.info("program %s v%d in place", info.program, info.version)

    async def _reload(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rules_reload_seconds)
            try:
                await (self.service.refresh() if self.mirror is None else self.mirror.pull())
            except DivergedFromLeader as exc:
                # Serving on would price receipts under versions no other replica has (or never
                # copy the leader's again): stop, as a start with this directory would.
                log.critical("stopping: %s", exc)
                self.diverged = str(exc)
                await self.server.stop()
                return
            except Exception:
                log.exception("reloading program versions failed; retrying")

    async def _cleanup(self) -> None:
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.worker is not None:
            await self.worker.bus.close()
            await clients.close(self.worker.ledger)
        if self.mirror is not None:
            await clients.close(self.mirror.leader)
        self.game.store.close()
        self.store.close()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


async def build(settings: Settings, *, clock: Clock | None = None, address: str | None = None) -> RulesApp:
    store = VersionStore(settings.data_dir / "rules" / "programs.db")
    clock = clock or SystemClock()
    service = RulesService(store, clock)
    game = GameService(service, GameStore(settings.data_dir / "rules" / "gamification.db"), clock)
    server = GrpcServer("rules", address or settings.rules_addr, grace_seconds=settings.grace_seconds)
    mirror, worker = None, None
    if settings.rules_leader_addr:
        mirror = LeaderMirror(rules_stub(settings.rules_leader_addr), store, service)
        servicer: RulesServicer = FollowerServicer(service, game, mirror)
        if settings.gamification_consumer:
            log.info("follower of %s: the leader consumes gamification events", settings.rules_leader_addr)
    else:
        servicer = RulesServicer(service, game)
        if settings.gamification_consumer:
            name = consumer_name("rules", settings.data_dir, address or settings.rules_addr)
            worker = GameWorker(game.store, game.program_at, settings.program, open_bus(settings),
                                ledger_stub(settings.ledger_addr), name,
                                retention=timedelta(days=settings.idempotency_retention_days))  # fmt: skip
    server.add_service(lambda s: rules_pb2_grpc.add_RulesServiceServicer_to_server(servicer, s), SERVICE_NAME)
    app = RulesApp(settings, service, server, store, game, worker, mirror=mirror)
    server.on_stop(app._cleanup)
    return app


async def serve(settings: Settings) -> None:
    app = await build(settings)
    await app.start()
    await app.server.serve_until_signal()
    if app.diverged:
        raise DivergedFromLeader(app.diverged)
