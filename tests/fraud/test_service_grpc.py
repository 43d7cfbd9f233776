"""fraud_svc through a real gRPC server with real Redis velocity state and models trained here
on generated data: decisions with reasons, batch scoring, churn and offers, hot reload."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from fraud_svc.app import FraudApp, build
from fraud_svc.domain import TxContext, TxKind, Verdict
from fraud_svc.synth import SynthConfig, generate
from fraud_svc.training import train_churn, train_fraud
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.rpc import client_channel
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, fraud_pb2, fraud_pb2_grpc

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    train_fraud(root, rows=20_000, seed=3)
    train_churn(root, members=2_000, seed=3)
    return root


@pytest.fixture
async def fraud(
    tmp_path: Path, trained: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub]]:
    models = tmp_path / "models"
    shutil.copytree(trained, models)
    settings = load_settings({}, data_dir=tmp_path, redis_url=redis_server.url, models_dir=str(models),
                             fraud_addr="127.0.0.1:0", grace_seconds=1.0)  # fmt: skip
    app = await build(settings, clock=ManualClock(NOW))
    await app.start()
    channel = client_channel(f"127.0.0.1:{app.port}", default_timeout_seconds=10.0)
    yield app, fraud_pb2_grpc.FraudServiceStub(channel)
    await channel.close()
    await app.stop(grace=1.0)


def tx(event_id: str, kind: int = fraud_pb2.SCORED_KIND_PURCHASE, member: str = "m_alice", at: datetime = NOW,
       **fields: object) -> fraud_pb2.ScoredTransaction:  # fmt: skip
    base: dict[str, object] = {
        "event_id": event_id, "kind": kind, "member_id": member, "occurred_at": to_timestamp(at), "channel": "pos",
        "store_id": "HEL-01", "amount": common_pb2.Money(amount_minor=2500, currency="EUR"), "points": 25,
        "device_id": "dev-1", "member_since": to_timestamp(at - timedelta(days=400)), "balance_points": 3000,
    }  # fmt: skip
    base.update(fields)
    return fraud_pb2.ScoredTransaction(**base)  # type: ignore[arg-type]


async def test_the_served_verdict_follows_the_models_score_and_thresholds(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub],
) -> None:
    app, stub = fraud
    limits = app.service.serving.config.thresholds_for(TxKind.PURCHASE)
    for i in range(5):
        got = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx(f"p-{i}", member=f"m_{i}", card_hash=f"c{i}")))
        assert got.model_version == app.service.fraud.model.version  # type: ignore[union-attr]
        assert 0.0 <= got.score <= 1.0
        expected = (fraud_pb2.VERDICT_DENY if got.score >= limits.deny
                    else fraud_pb2.VERDICT_REVIEW if got.score >= limits.review else fraud_pb2.VERDICT_ALLOW)  # fmt: skip
        assert got.verdict == expected
        assert all(r.code.startswith("model:") and r.weight > 0 for r in got.reasons)


async def test_a_burst_of_purchases_trips_the_velocity_rule_and_a_blocked_device_is_denied(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub],
) -> None:
    app, stub = fraud
    verdicts = []
    for i in range(12):
        got = await stub.Score(
            fraud_pb2.ScoreRequest(transaction=tx(f"b-{i}", member="m_burst", at=NOW + timedelta(seconds=20 * i)))
        )
        verdicts.append(got.verdict)
    assert verdicts[-1] != fraud_pb2.VERDICT_ALLOW
    codes = {r.code for r in got.reasons}
    assert "rule:velocity_member_purchases_10m" in codes
    # Scoring the same event again does not count it twice.
    again = await stub.Score(
        fraud_pb2.ScoreRequest(transaction=tx("b-11", member="m_burst", at=NOW + timedelta(seconds=220)))
    )
    assert again.reasons == got.reasons and again.score == got.score
    app.service.configure({"blocked_devices": ["dev-evil"]})
    denied = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("d-1", device_id="dev-evil")))
    assert denied.verdict == fraud_pb2.VERDICT_DENY and denied.reasons[0].code == "rule:blocked_device"


async def test_bad_score_requests_name_the_field(fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub]) -> None:
    _app, stub = fraud
    cases = {
        "transaction.kind": tx("x-1", kind=fraud_pb2.SCORED_KIND_UNSPECIFIED),
        "transaction.event_id": tx(""),
        "transaction.points": tx("x-2", points=-5),
        "transaction.counterparty_member_id": tx("x-3", kind=fraud_pb2.SCORED_KIND_TRANSFER),
    }
    missing_time = tx("x-4")
    missing_time.ClearField("occurred_at")
    cases["transaction.occurred_at"] = missing_time
    for field, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Score(fraud_pb2.ScoreRequest(transaction=request))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:"), caught.value.details()
    batch = await stub.ScoreBatch(fraud_pb2.ScoreBatchRequest(transactions=[tx("ok-1"), tx("")]))
    assert [i.WhichOneof("outcome") for i in batch.items] == ["result", "error"]


async def test_churn_and_offers_favour_the_member_drifting_away(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub],
) -> None:
    _app, stub = fraud
    loyal = fraud_pb2.MemberActivity(
        member_id="m_loyal", member_since=to_timestamp(NOW - timedelta(days=900)),
        last_purchase_at=to_timestamp(NOW - timedelta(days=2)), purchases_30d=6, purchases_90d=18, purchases_365d=70,
        spend_90d_minor=90_000, balance_points=1200, last_redemption_at=to_timestamp(NOW - timedelta(days=20)),
    )  # fmt: skip
    drifting = fraud_pb2.MemberActivity(
        member_id="m_drift", member_since=to_timestamp(NOW - timedelta(days=900)),
        last_purchase_at=to_timestamp(NOW - timedelta(days=80)), purchases_30d=0, purchases_90d=1, purchases_365d=14,
        spend_90d_minor=60_000, balance_points=5200,
    )  # fmt: skip
    as_of = to_timestamp(NOW)
    a = await stub.ChurnScore(fraud_pb2.ChurnScoreRequest(activity=loyal, as_of=as_of))
    b = await stub.ChurnScore(fraud_pb2.ChurnScoreRequest(activity=drifting, as_of=as_of))
    assert b.probability > a.probability and b.factors
    offers = await stub.Offers(fraud_pb2.OffersRequest(activity=drifting, as_of=as_of))
    values = [o.expected_value_points for o in offers.offers]
    assert values == sorted(values, reverse=True) and all(v > 0 for v in values)
    none = await stub.Offers(fraud_pb2.OffersRequest(activity=loyal, as_of=as_of))
    assert len(none.offers) <= len(offers.offers)


async def test_a_corrupt_model_is_refused_and_the_serving_one_keeps_serving(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub], tmp_path: Path
) -> None:
    app, stub = fraud
    serving = app.service.fraud.model
    assert serving is not None
    broken = tmp_path / "broken-fraud"
    shutil.copytree(serving.path, broken)
    model_file = broken / "model.txt"
    model_file.write_text(model_file.read_text()[: len(model_file.read_text()) // 2])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path=str(broken)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "checksum" in caught.value.details()
    still = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("after-corrupt")))
    assert still.model_version == serving.version
    fresh = await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path=str(serving.path)))
    assert (fresh.version, fresh.previous_version) == (serving.version, serving.version)


def edited_copy(source: Path, target: Path, **metadata: object) -> Path:
    """A copy of an artifact with metadata fields replaced (the checksum covers model.txt only)."""
    shutil.copytree(source, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta.update(metadata)
    (target / "metadata.json").write_text(json.dumps(meta))
    return target


async def test_a_reload_refused_for_its_thresholds_leaves_model_and_thresholds_as_they_were(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub], tmp_path: Path
) -> None:
    app, stub = fraud
    serving = app.service.serving
    assert serving.model is not None
    bad = edited_copy(serving.model.path, tmp_path / "fraud-bad", version="fraud-bad",
                       thresholds={"purchase": {"review": 0.9, "deny": 0.1}})  # fmt: skip

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path=str(bad)))
    still = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("after-bad-thresholds")))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert still.model_version == serving.model.version
    assert app.service.serving is serving and app.service.fraud.model is serving.model


async def test_a_reload_swaps_model_and_thresholds_together(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub], tmp_path: Path
) -> None:
    app, stub = fraud
    before = app.service.serving
    assert before.model is not None
    strict = {**before.model.metadata["thresholds"], "purchase": {"review": 0.0, "deny": 1.0}}
    fresh = edited_copy(before.model.path, tmp_path / "fraud-strict", version="fraud-strict", thresholds=strict)

    await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path=str(fresh)))
    after = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("after-strict")))

    assert app.service.serving.model is not None and app.service.serving.model.version == "fraud-strict"
    assert app.service.serving.config.thresholds_for(TxKind.PURCHASE).review == 0.0
    assert (after.model_version, after.verdict) == ("fraud-strict", fraud_pb2.VERDICT_REVIEW)


def _half_copied(newest: Path) -> None:
    (newest / "model.txt").write_text("tree\nversion=v4\n")


def _unreadable_model_file(newest: Path) -> None:
    """A model file the file system refuses to look at (a name too long; a file the service user
    may not read is the same OSError): it crashed start-up."""
    meta = json.loads((newest / "metadata.json").read_text())
    (newest / "metadata.json").write_text(json.dumps({**meta, "model_file": "m" * 300}))


@pytest.mark.parametrize(("broken", "refused"), [(_half_copied, "checksum"), (_unreadable_model_file, "cannot read")])
async def test_a_broken_newest_artifact_does_not_keep_fraud_svc_from_starting(
    tmp_path: Path, trained: Path, redis_server: RedisServer, broken: Callable[[Path], None], refused: str
) -> None:
    models = tmp_path / "models"
    shutil.copytree(trained, models)
    good = max(p.name for p in models.iterdir() if p.name.startswith("fraud-"))
    broken(edited_copy(models / good, models / f"{good}-zz-broken"))  # sorts after the good one
    settings = load_settings({}, data_dir=tmp_path, redis_url=redis_server.url, models_dir=str(models),
                             fraud_addr="127.0.0.1:0", grace_seconds=1.0)  # fmt: skip
    app = await build(settings)
    await app.start()
    try:
        assert app.service.serving.model is not None and app.service.serving.model.path.name == good
        with pytest.raises(Exception, match=refused):
            await app.service.reload("fraud", "")  # a reload asks for the newest and refuses it
        assert app.service.serving.model.path.name == good
    finally:
        await app.stop(grace=0.5)


def _tagged(ctx: TxContext, tag: str) -> TxContext:
    """The same event in a world of its own: every entity the velocity state keys on is renamed."""

    def t(value: str) -> str:
        return f"{tag}{value}" if value else value

    return replace(ctx, event_id=t(ctx.event_id), member_id=t(ctx.member_id), store_id=t(ctx.store_id),
                   device_id=t(ctx.device_id), ip=t(ctx.ip), card_hash=t(ctx.card_hash),
                   employee_card=t(ctx.employee_card), counterparty_member_id=t(ctx.counterparty_member_id))  # fmt: skip


async def test_a_batch_decides_exactly_as_the_same_events_scored_one_by_one(
    fraud: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub],
) -> None:
    app, _stub = fraud
    clock = app.service.clock
    assert isinstance(clock, ManualClock)
    events = list(generate(SynthConfig.for_rows(6_000, seed=21)).contexts())[:1_200]
    single = []
    for ctx in events:
        clock.set(ctx.occurred_at)  # generated months ago: scored as if they had just happened
        single.append(await app.service.score(_tagged(ctx, "one-")))
    batched = []
    for start in range(0, len(events), 300):
        clock.set(events[min(start + 300, len(events)) - 1].occurred_at)
        batched += await app.service.score_batch([_tagged(ctx, "many-") for ctx in events[start : start + 300]])
    assert [(d.verdict, d.score, [r.code for r in d.reasons]) for d in single] == [
        (d.verdict, d.score, [r.code for r in d.reasons])
        for d in batched  # type: ignore[union-attr]
    ]
    assert {d.verdict for d in single} >= {Verdict.ALLOW, Verdict.REVIEW}
