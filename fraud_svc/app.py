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

import yaml
from redis.asyncio import Redis

from fraud_svc.decide import DecisionConfig
from fraud_svc.domain import BadRequest
from fraud_svc.model import latest_artifact
from fraud_svc.offers import DEFAULT_CATALOGUE, CatalogueOffer, catalogue_of
from fraud_svc.server import FraudServicer
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.training import train_churn, train_fraud
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.clock import Clock, SystemClock
from pointmesh.config import ConfigError, Settings
from pointmesh.redis_client import open_redis
from pointmesh.rpc import GrpcServer
from pointmesh.strict_files import DuplicateKey, load_strict
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


DECISION_KEYS = frozenset({"thresholds", "rules", "blocked_devices", "unscored_verdict"})


def _operator_file(path: str, what: str) -> object:
    """A YAML (or JSON) document the fraud team keeps; ConfigError naming it if unreadable or
    if it gives a key twice in one mapping (`deny: 0.9` twice must not serve the last one)."""
    try:
        return load_strict(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    except DuplicateKey as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: not valid YAML or JSON: {exc}") from None


def decision_overrides(settings: Settings) -> dict[str, object]:
    """POINTMESH_FRAUD_DECISION_FILE: thresholds, velocity rules and blocked devices over what
    the model proposes, checked field by field before anything is served (a typo in a key is
    refused, not ignored)."""
    path = settings.fraud_decision_file
    if not path:
        return {}
    data = _operator_file(path, "fraud decision file")
    if not isinstance(data, dict):
        raise ConfigError(f"fraud decision file {path}: a mapping of {sorted(DECISION_KEYS)} is expected")
    try:
        _check_shape(data)
        DecisionConfig.from_mapping(data)
    except BadRequest as exc:
        raise ConfigError(f"fraud decision file {path}: {exc.field}: {exc.message}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"fraud decision file {path}: {exc}") from None
    return data


RULE_KEYS = frozenset({"name", "feature", "limit", "verdict", "kinds"})


def _check_shape(data: dict[str, object]) -> None:
    """Keys the service would ignore are refused (a typo must not leave a rule firing on every
    kind), and thresholds come in pairs: the file's review and deny for a kind then make a
    valid pair whatever model they are laid over."""
    # By repr: YAML 1.1 reads `on:` as the key True, and True does not compare with a str.
    unknown = sorted(set(data) - DECISION_KEYS, key=repr)
    if unknown:
        raise BadRequest(f"unknown keys {unknown}; known: {sorted(DECISION_KEYS)}", field="(top)")
    thresholds = data.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise BadRequest("a mapping of kind -> {review, deny}", field="thresholds")
    for kind, pair in thresholds.items():
        if not isinstance(pair, dict) or set(pair) != {"review", "deny"}:
            raise BadRequest("both review and deny, nothing else", field=f"thresholds.{kind}")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise BadRequest("a list of rules", field="rules")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not set(rule) <= RULE_KEYS:
            raise BadRequest(f"a mapping of {sorted(RULE_KEYS)}", field=f"rules[{i}]")
        if "kinds" in rule and not isinstance(rule["kinds"], list):
            raise BadRequest("a list of kinds", field=f"rules[{i}].kinds")


def offer_catalogue(settings: Settings) -> tuple[CatalogueOffer, ...]:
    """POINTMESH_FRAUD_OFFER_CATALOGUE_FILE: the retention offers Offers chooses from."""
    path = settings.fraud_offer_catalogue_file
    if not path:
        return DEFAULT_CATALOGUE
    try:
        return catalogue_of(_operator_file(path, "offer catalogue"))
    except BadRequest as exc:
        raise ConfigError(f"offer catalogue {path}: {exc.field}: {exc.message}") from None


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
    overrides, catalogue = decision_overrides(settings), offer_catalogue(settings)  # refused before serving
    clock = clock or SystemClock()
    redis = open_redis(settings.redis_url)
    root = models_dir(settings)
    service = FraudService(RedisVelocity(redis), ModelSlot("fraud", root), ModelSlot("churn", root),
                           overrides=overrides, catalogue=catalogue, clock=clock)  # fmt: skip
    server = GrpcServer("fraud", address or settings.fraud_addr, grace_seconds=settings.grace_seconds)
    servicer = FraudServicer(service, clock.now)
    server.add_service(lambda s: fraud_pb2_grpc.add_FraudServiceServicer_to_server(servicer, s), SERVICE_NAME)
    app = FraudApp(settings, service, server, redis)
    server.on_stop(app._cleanup)
    return app


async def serve(settings: Settings) -> None:
    try:
        app = await build(settings)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from exc
    await app.start()
    await app.server.serve_until_signal()
