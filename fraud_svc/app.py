"""Wires fraud_svc from Settings: Redis velocity state, model slots, gRPC server.

At start-up it loads the newest fraud and churn artifacts; when there are none (a fresh
`make up` or test run) it trains small default models from generated data first, so nothing
is ever downloaded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from fraud_svc.model import latest_artifact
from fraud_svc.offers import DEFAULT_CATALOGUE
from fraud_svc.server import FraudServicer
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.training import train_churn, train_fraud
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.clock import Clock, SystemClock
from pointmesh.config import Settings
from pointmesh.rpc import GrpcServer
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = fraud_pb2.DESCRIPTOR.services_by_name["FraudService"].full_name


def models_dir(settings: Settings) -> Path:
    return Path(settings.models_dir) if settings.models_dir else settings.data_dir / "models"


def ensure_default_models(settings: Settings) -> None:
    root = models_dir(settings)
    if latest_artifact(root, "fraud") is None:
        log.info("no fraud model under %s; training a default one on generated data", root)
        train_fraud(root, rows=settings.default_model_rows, seed=1)
    if latest_artifact(root, "churn") is None:
        log.info("no churn model under %s; training a default one on generated data", root)
        train_churn(root, members=max(2_000, settings.default_model_rows // 10), seed=1)


@dataclass
class FraudApp:
    settings: Settings
    service: FraudService
    server: GrpcServer
    redis: Redis

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> int:
        await asyncio.to_thread(ensure_default_models, self.settings)
        self.service.load_at_start()
        return await self.server.start()

    async def _cleanup(self) -> None:
        await self.redis.aclose()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


async def build(settings: Settings, *, clock: Clock | None = None, address: str | None = None) -> FraudApp:
    clock = clock or SystemClock()
    redis = Redis.from_url(settings.redis_url)
    root = models_dir(settings)
    service = FraudService(RedisVelocity(redis), ModelSlot("fraud", root), ModelSlot("churn", root),
                           catalogue=DEFAULT_CATALOGUE, clock=clock)  # fmt: skip
    server = GrpcServer("fraud", address or settings.fraud_addr, grace_seconds=settings.grace_seconds)
    servicer = FraudServicer(service, clock.now)
    server.add_service(lambda s: fraud_pb2_grpc.add_FraudServiceServicer_to_server(servicer, s), SERVICE_NAME)
    app = FraudApp(settings, service, server, redis)
    server.on_stop(app._cleanup)
    return app


async def serve(settings: Settings) -> None:
    app = await build(settings)
    await app.start()
    await app.server.serve_until_signal()
