"""Regressions for proven bugs: velocity parity on a duplicate, start-up fall-back past bad
thresholds, unambiguous screening event ids, and strict decision configuration."""

from __future__ import annotations

import json
import math
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from fraud_svc.decide import DecisionConfig, VelocityRule, decide
from fraud_svc.domain import BadRequest, ModelUnavailable, TxContext, TxKind, Verdict
from fraud_svc.features import FEATURE_NAMES, FeatureRow, featurize
from fraud_svc.model import latest_artifact
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.training import train_churn, train_fraud
from fraud_svc.velocity import MemoryVelocity, Track, TrackSpec, Velocity
from fraud_svc.velocity_redis import RedisVelocity
from ledger_svc.screening import MAX_EVENT_ID, event_id
from pointmesh.redis_server import RedisServer

MIN = 60_000
SPEC = TrackSpec((10 * MIN, 60 * MIN), (60 * MIN,), (60 * MIN,), want_prev=True, retention_ms=60 * MIN)
T0 = 1_760_000_000_000


# 1. A duplicate still trims what fell out of the retention (as the Redis script does).


async def test_a_duplicate_trims_entries_past_the_retention_in_both_stores(velocity: Velocity) -> None:
    async def buy(eid: str, minutes: int, amount: int, card: str) -> tuple[int, ...]:
        return await velocity.observe(eid, T0 + minutes * MIN, [Track(SPEC, "m:1", amount, card, True)], [])

    answers = [
        await buy("a", 100, 1, "x"),
        await buy("b", 10, 2, "y"),  # late, already past "a"'s retention (an hour)
        await buy("a", 100, 1, "x"),  # "a" redelivered: records nothing, trims "b"
        await buy("c", 50, 3, "z"),  # late again: "b" would be in its hour had it been kept
    ]
    assert answers[2] == (1, 1, 1, 1, -1)
    assert answers[3] == (1, 1, 3, 1, -1)


async def test_memory_and_redis_agree_on_a_redelivered_event_around_a_late_one(redis_server: RedisServer) -> None:
    at = datetime(2026, 3, 1, 12, tzinfo=UTC)

    def buy(eid: str, when: datetime) -> TxContext:
        return TxContext(eid, TxKind.PURCHASE, "m1", when, channel="pos", store_id="s1", amount_minor=1000)

    events = [buy("e1", at), buy("e0", at - timedelta(days=40)), buy("e1", at), buy("e2", at - timedelta(days=39))]
    client = Redis.from_url(redis_server.url)
    try:
        redis_velocity = RedisVelocity(client, prefix=f"test:{uuid.uuid4().hex}:")
        online = [(await featurize(ctx, redis_velocity)).values for ctx in events]
    finally:
        await client.aclose()
    memory = MemoryVelocity()
    offline = [(await featurize(ctx, memory)).values for ctx in events]
    since = FEATURE_NAMES.index("member_hours_since_last_event")
    # e0 (40 days back) is past the member's 30-day retention when e1 is redelivered: gone,
    # so e2 has no earlier event to measure from
    assert math.isnan(online[3][since]) and math.isnan(offline[3][since])
    for row_online, row_offline in zip(online, offline, strict=True):
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(row_online, row_offline, strict=True))


# 2. A newest artifact with bad thresholds does not keep fraud_svc from starting.


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hunt-models")
    train_fraud(root, rows=6_000, seed=1)
    train_churn(root, members=2_000, seed=1)
    return root


def _with_bad_thresholds(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta["version"] = target.name
    meta["thresholds"]["redemption"] = {"review": 0.9, "deny": 0.5}  # deny below review
    (target / "metadata.json").write_text(json.dumps(meta))
    return target


def test_start_up_skips_a_newest_artifact_whose_thresholds_are_invalid(small_models: Path, tmp_path: Path) -> None:
    models = Path(shutil.copytree(small_models, tmp_path / "models"))
    good = latest_artifact(models, "fraud")
    assert good is not None
    bad = _with_bad_thresholds(good, models / "fraud-29991231T000000Z-deadbeef")  # sorts after the good one
    assert latest_artifact(models, "fraud") == bad

    service = FraudService(MemoryVelocity(), ModelSlot("fraud", models), ModelSlot("churn", models))
    service.load_at_start()

    assert service.fraud.model is not None and service.fraud.model.path.name == good.name
    assert service.serving.model is service.fraud.model
    assert service.serving.config.thresholds_for(TxKind.REDEMPTION).review <= 1.0
    # a reload of the bad one is refused as before (a bad request) and the good one keeps serving
    with pytest.raises(BadRequest) as refused:
        service.fraud.read(str(bad), check=service.check_model)
    assert refused.value.field == "thresholds"
    assert service.fraud.model.path.name == good.name


def test_start_up_with_only_bad_thresholds_is_refused_saying_why(small_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    good = latest_artifact(small_models, "fraud")
    churn = latest_artifact(small_models, "churn")
    assert good is not None and churn is not None
    shutil.copytree(churn, models / churn.name)
    _with_bad_thresholds(good, models / good.name)
    service = FraudService(MemoryVelocity(), ModelSlot("fraud", models), ModelSlot("churn", models))
    with pytest.raises(ModelUnavailable, match="thresholds"):
        service.load_at_start()
    assert service.fraud.model is None and service.serving.model is None


# 3. Screening event ids: a ':' in a namespace cannot make two operations share an id.


def test_screening_event_ids_do_not_collide_when_a_namespace_holds_a_colon() -> None:
    assert event_id("redeem", "pos:k1", "abc") != event_id("redeem", "pos", "k1:abc")
    assert event_id("redeem", "pos%3Ak1", "abc") != event_id("redeem", "pos:k1", "abc")
    assert event_id("transfer", "web:k2", "a:b") == event_id("transfer", "web:k2", "a:b")
    assert event_id("redeem", "pos", "k1:abc") == "redeem:pos:k1:abc"  # plain ids read as before
    long_key = "x" * 200
    assert event_id("hold", "pos:k1", long_key) != event_id("hold", "pos", f"k1:{long_key}")
    assert len(event_id("hold", "pos:k1", long_key)) <= MAX_EVENT_ID


# 4. Decision configuration refuses values that would silently disable a rule.


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"blocked_devices": "dv00ff12"}, "blocked_devices"),
        ({"blocked_devices": ["dv1", 7]}, "blocked_devices"),
        ({"blocked_devices": {"dv1": True}}, "blocked_devices"),
        ({"rules": [{"name": "x", "feature": "points", "limit": "nan"}]}, "rules.limit"),
        ({"rules": [{"name": "x", "feature": "points", "limit": float("nan")}]}, "rules.limit"),
        ({"rules": [{"name": "x", "feature": "points", "limit": float("inf")}]}, "rules.limit"),
        ({"rules": [{"name": "x", "feature": "points", "limit": True}]}, "rules.limit"),
        ({"thresholds": {"purchase": {"review": "nan"}}}, "thresholds"),
        ({"thresholds": {"purchase": {"deny": float("nan")}}}, "thresholds"),
    ],
)
def test_configuration_that_would_disable_a_rule_is_refused_naming_the_field(
    data: dict[str, object], field: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        DecisionConfig.from_mapping(data)
    assert refused.value.field == field


def test_a_rule_built_directly_refuses_a_limit_that_is_not_finite() -> None:
    with pytest.raises(BadRequest) as refused:
        VelocityRule("x", "points", float("nan"))
    assert refused.value.field == "rules.limit"


def test_a_blocked_device_given_as_a_list_is_denied() -> None:
    config = DecisionConfig.from_mapping({"blocked_devices": ["dv00ff12"]})
    ctx = TxContext("e", TxKind.REDEMPTION, "m", datetime(2026, 1, 1, tzinfo=UTC), device_id="dv00ff12")
    row = FeatureRow(tuple(0.0 for _ in FEATURE_NAMES))
    assert decide(ctx, row, 0.0, (), config).verdict is Verdict.DENY
