"""The fraud team's configuration reaches the running service: a decision file (thresholds,
velocity rules, blocked devices over what the model proposes) and an offer catalogue, read at
start-up from POINTMESH_FRAUD_DECISION_FILE and POINTMESH_FRAUD_OFFER_CATALOGUE_FILE. Before,
build() served the model's thresholds and the built-in catalogue whatever was configured: a
device could not be blocked without editing a model's metadata. A bad file stops the start
with a message naming the file and the field, and nothing is served from it."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from fraud_svc.app import FraudApp, build
from pointmesh.clock import ManualClock
from pointmesh.config import ConfigError, load_settings
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc
from tests.fraud.test_event_time_and_bounds import NOW, tx

DECISIONS = """
blocked_devices: [dev-stolen-7]
thresholds:
  redemption: {review: 0.3, deny: 0.9}
"""
CATALOGUE = """
- {offer_id: winback-1000, title: "1000 points to come back", bonus_points: 100, uplift_percent: 40}
- {offer_id: vip-only, title: "VIP lounge", bonus_points: 10, uplift_percent: 50, segments: [vip]}
"""

Started = Callable[[dict[str, str]], Awaitable[fraud_pb2_grpc.FraudServiceStub]]


@pytest.fixture
async def started(tmp_path: Path, redis_server: RedisServer, fraud_models: Path) -> AsyncIterator[Started]:
    """Starts fraud_svc with the given settings files (written under tmp_path); its stub."""
    models = tmp_path / "models"
    shutil.copytree(fraud_models, models)
    apps: list[FraudApp] = []
    channels: list[grpc.aio.Channel] = []

    async def start(files: dict[str, str]) -> fraud_pb2_grpc.FraudServiceStub:
        paths = {}
        for setting, text in files.items():
            (tmp_path / setting).write_text(text)
            paths[setting] = str(tmp_path / setting)
        address = f"127.0.0.1:{free_port()}"
        settings = load_settings({}, redis_url=redis_server.url, models_dir=str(models), fraud_addr=address,
                                 grace_seconds=0.5, **paths)  # fmt: skip
        app = await build(settings, clock=ManualClock(NOW))
        await app.start()
        apps.append(app)
        channels.append(grpc.aio.insecure_channel(address))
        return fraud_pb2_grpc.FraudServiceStub(channels[-1])

    yield start
    for channel in channels:
        await channel.close()
    for app in apps:
        await app.stop(grace=0.5)


async def test_a_blocked_device_in_the_decision_file_is_denied_by_the_running_service(started: Started) -> None:
    plain = await started({})
    got = await plain.Score(fraud_pb2.ScoreRequest(transaction=tx("d-0", "m_dev0", device_id="dev-stolen-7")))
    assert got.verdict != fraud_pb2.VERDICT_DENY

    configured = await started({"fraud_decision_file": DECISIONS})
    got = await configured.Score(fraud_pb2.ScoreRequest(transaction=tx("d-1", "m_dev1", device_id="dev-stolen-7")))
    assert got.verdict == fraud_pb2.VERDICT_DENY
    assert "rule:blocked_device" in [r.code for r in got.reasons]


async def test_offers_come_from_the_configured_catalogue(started: Started) -> None:
    stub = await started({"fraud_offer_catalogue_file": CATALOGUE})
    drifting = fraud_pb2.MemberActivity(
        member_id="m_drift", member_since=to_timestamp(NOW - timedelta(days=900)),
        last_purchase_at=to_timestamp(NOW - timedelta(days=80)), purchases_30d=0, purchases_90d=1, purchases_365d=14,
        spend_90d_minor=600_000, balance_points=5200,
    )  # fmt: skip
    offers = await stub.Offers(fraud_pb2.OffersRequest(activity=drifting, as_of=to_timestamp(NOW)))
    assert [o.offer_id for o in offers.offers] == ["winback-1000"]  # vip-only: another segment


@pytest.mark.parametrize(
    ("setting", "text", "named"),
    [
        ("fraud_decision_file", "blocked_device: [x]\n", "unknown keys ['blocked_device']"),
        ("fraud_decision_file", "thresholds: {redemption: {review: lots, deny: 0.9}}\n", "thresholds"),
        ("fraud_decision_file", "thresholds: {purchase: {review: 0.9}}\n", "thresholds.purchase: both review and deny"),
        ("fraud_decision_file", "rules: 5\n", "rules: a list of rules"),
        ("fraud_decision_file", "rules: [{name: r, feature: member_returns_7d, limit: 3, kind: [transfer]}]\n",
         "rules[0]: a mapping of"),
        ("fraud_decision_file", "- not a mapping\n", "a mapping of"),
        ("fraud_decision_file", "thresholds: {\n", "not valid YAML or JSON"),
        ("fraud_offer_catalogue_file", "- {offer_id: a, title: A, bonus_points: -5, uplift_percent: 10}\n",
         "[0].bonus_points"),
        ("fraud_offer_catalogue_file", "- {offer_id: a, title: A, bonus_points: 5, uplift_percent: 10, colour: red}\n",
         "unknown fields ['colour']"),
        ("fraud_offer_catalogue_file", "[]\n", "non-empty list"),
    ],
)  # fmt: skip
async def test_a_bad_file_stops_the_start_naming_the_file_and_the_field(
    tmp_path: Path, redis_server: RedisServer, setting: str, text: str, named: str
) -> None:
    path = tmp_path / "ops.yaml"
    path.write_text(text)
    settings = load_settings(
        {}, redis_url=redis_server.url, models_dir=str(tmp_path / "models"), **{setting: str(path)}
    )
    with pytest.raises(ConfigError) as refused:
        await build(settings)
    assert str(path) in str(refused.value) and named in str(refused.value)
    missing = load_settings({}, redis_url=redis_server.url, **{setting: str(tmp_path / "absent.yaml")})
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        await build(missing)
