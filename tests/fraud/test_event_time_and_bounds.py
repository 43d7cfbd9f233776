"""What fraud_svc lets into its velocity state: event times near its clock (an event dated
ahead would trim every key it touches to its own time and blind the rules), amounts a Redis
sum stays exact on, batch errors naming their item, and how long entries are kept so a late
event still sees what happened before it."""

from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from fraud_svc import service as fraud_service
from fraud_svc.app import FraudApp, build
from fraud_svc.domain import EXACT_LATENESS, FUTURE_SKEW, MAX_LATENESS, BadRequest, RowFailed, TxContext, TxKind
from fraud_svc.features import featurize, featurize_matrix
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.synth import SynthConfig, generate
from fraud_svc.velocity import MemoryVelocity, Track, TrackSpec, Velocity
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.bounds import MAX_AMOUNT_MINOR, MAX_POINTS
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.rpc import client_channel
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, fraud_pb2, fraud_pb2_grpc

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
YEAR_9999 = Timestamp(seconds=253402300000)  # 9999-12-31


@pytest.fixture
async def served(
    tmp_path: Path, fraud_models: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock]]:
    shutil.copytree(fraud_models, tmp_path / "models")
    settings = load_settings({}, data_dir=tmp_path, redis_url=redis_server.url, models_dir=str(tmp_path / "models"),
                             fraud_addr="127.0.0.1:0", grace_seconds=1.0)  # fmt: skip
    clock = ManualClock(NOW)
    app = await build(settings, clock=clock)
    await app.start()
    channel = client_channel(f"127.0.0.1:{app.port}", default_timeout_seconds=10.0)
    yield app, fraud_pb2_grpc.FraudServiceStub(channel), clock
    await channel.close()
    await app.stop(grace=1.0)


def tx(event_id: str, member: str, at: datetime = NOW, **fields: object) -> fraud_pb2.ScoredTransaction:
    base: dict[str, object] = {
        "event_id": event_id, "kind": fraud_pb2.SCORED_KIND_PURCHASE, "member_id": member,
        "occurred_at": to_timestamp(at), "channel": "pos", "store_id": f"st-{member}",
        "amount": common_pb2.Money(amount_minor=2500, currency="EUR"), "points": 25,
        "member_since": to_timestamp(at - timedelta(days=400)), "balance_points": 3000,
    }  # fmt: skip
    base.update(fields)
    return fraud_pb2.ScoredTransaction(**base)  # type: ignore[arg-type]


async def refused_on(stub: fraud_pb2_grpc.FraudServiceStub, transaction: fraud_pb2.ScoredTransaction) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(fraud_pb2.ScoreRequest(transaction=transaction))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details().split(":", 1)[0]


# 1. Event time is held near fraud_svc's clock.


async def test_a_far_future_purchase_is_refused_and_the_members_burst_is_still_caught(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock],
) -> None:
    """Recorded, a purchase dated 9999-12-31 trimmed the member's, the store's and the card's
    history to that date: the ninth purchase in eight minutes was then allowed with counts 1."""
    _app, stub, _clock = served
    member, card = "m_burst", "card-burst"
    for i in range(8):
        await stub.Score(fraud_pb2.ScoreRequest(transaction=tx(f"b{i}", member, NOW + timedelta(minutes=i),
                                                               card_hash=card)))  # fmt: skip

    field = await refused_on(stub, tx("b-future", member, card_hash=card, occurred_at=YEAR_9999))
    ninth = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("b8", member, NOW + timedelta(minutes=8),
                                                                   card_hash=card)))  # fmt: skip

    assert field == "transaction.occurred_at"
    assert ninth.verdict != fraud_pb2.VERDICT_ALLOW
    assert "rule:velocity_member_purchases_10m" in {r.code for r in ninth.reasons}


async def test_a_future_event_of_another_member_does_not_blind_a_shared_card(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock],
) -> None:
    """The card is shared state: one member's event dated ahead must not reset what four
    others did with it."""
    _app, stub, _clock = served
    card = "card-shared"
    for i, member in enumerate(("m_a", "m_b", "m_c")):
        await stub.Score(fraud_pb2.ScoreRequest(transaction=tx(f"s{i}", member, NOW + timedelta(minutes=i),
                                                               card_hash=card)))  # fmt: skip
    ahead = NOW + timedelta(days=60)  # past what the card keeps: recorded, it would trim all of it
    assert await refused_on(stub, tx("s-ahead", "m_x", ahead, card_hash=card)) == "transaction.occurred_at"

    fourth = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("s3", "m_d", NOW + timedelta(minutes=3),
                                                                    card_hash=card)))  # fmt: skip

    assert "rule:velocity_card_members_24h" in {r.code for r in fourth.reasons}


async def test_occurred_at_is_taken_within_the_skew_ahead_and_the_lateness_behind(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock],
) -> None:
    _app, stub, clock = served
    now = clock.now()
    second = timedelta(seconds=1)
    # Late by the ledger's bound and the skew: what a ledger a little behind accepted is scored.
    late = MAX_LATENESS + FUTURE_SKEW
    for eid, at in (("edge-ahead", now + FUTURE_SKEW), ("edge-late", now - late)):
        assert (await stub.Score(fraud_pb2.ScoreRequest(transaction=tx(eid, f"m_{eid}", at)))).event_id == eid
    for eid, at in (("past-ahead", now + FUTURE_SKEW + second), ("past-late", now - late - second)):
        assert await refused_on(stub, tx(eid, f"m_{eid}", at)) == "transaction.occurred_at"
    assert await refused_on(stub, tx("year-1", "m_y1", occurred_at=Timestamp(seconds=-62135596800))) == (
        "transaction.occurred_at"
    )
    clock.advance(timedelta(days=400))  # the same event is fine once the clock has caught up with it
    late = now + timedelta(days=400)
    assert (await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("caught-up", "m_cu", late)))).event_id


@pytest.mark.parametrize(
    ("name", "moment"),
    [
        pytest.param("member_since", Timestamp(seconds=-62135596800), id="member-since-year-1"),
        pytest.param("member_since", to_timestamp(NOW + timedelta(days=3000)), id="member-since-ahead"),
        pytest.param("contact_changed_at", Timestamp(seconds=-1), id="contact-before-1970"),
        pytest.param(
            "contact_changed_at",
            to_timestamp(NOW + FUTURE_SKEW + timedelta(seconds=1)),
            id="contact-ahead-of-the-clock",
        ),
    ],
)
async def test_member_since_and_contact_change_lie_between_1970_and_the_clock(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock], name: str, moment: Timestamp
) -> None:
    _app, stub, _clock = served
    assert await refused_on(stub, tx(f"t-{name}", "m_times", **{name: moment})) == f"transaction.{name}"


async def test_a_late_receipt_of_a_member_who_joined_since_is_scored(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock],
) -> None:
    """The ledger takes a receipt days late from a member who enrolled (or changed their phone
    number) after the purchase: loadgen does, with receipts of the previous day."""
    _app, stub, clock = served
    joined = to_timestamp(clock.now() - timedelta(minutes=5))
    late = tx("joined-since", "m_new", clock.now() - timedelta(days=3), member_since=joined, contact_changed_at=joined)
    assert (await stub.Score(fraud_pb2.ScoreRequest(transaction=late))).event_id == "joined-since"


async def test_offline_featurisation_and_training_data_keep_their_historical_times() -> None:
    """Generated data starts in 2025 by design: featurisation for training and replays never
    goes through the served check, whatever the date today."""
    events = list(generate(SynthConfig.for_rows(3_000, seed=4)).contexts())[:500]
    assert events[0].occurred_at < datetime.now(UTC) - MAX_LATENESS
    matrix = featurize_matrix(events)
    assert matrix.shape[0] == len(events) and not math.isnan(matrix[-1, 0])


# 2. A batch item's error names that item.


async def test_a_batch_items_own_errors_name_transactions_i(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock],
) -> None:
    _app, stub, _clock = served
    got = await stub.ScoreBatch(fraud_pb2.ScoreBatchRequest(transactions=[
        tx("bt0", "m_bt"), tx("bt1", ""), tx("bt2", "m_bt", points=-1), tx("bt3", "m_bt", occurred_at=YEAR_9999),
        tx("bt4", "m_bt", kind=fraud_pb2.SCORED_KIND_TRANSFER),
    ]))  # fmt: skip

    assert got.items[0].result.event_id == "bt0"
    assert [item.error.split(":", 1)[0] for item in got.items[1:]] == [
        "transactions[1].member_id", "transactions[2].points", "transactions[3].occurred_at",
        "transactions[4].counterparty_member_id",
    ]  # fmt: skip


async def test_score_batch_in_process_names_the_item_too(fraud_models: Path) -> None:
    service = FraudService(MemoryVelocity(), ModelSlot("fraud", fraud_models), ModelSlot("churn", fraud_models),
                           clock=ManualClock(NOW))  # fmt: skip
    fine = TxContext("ok", TxKind.PURCHASE, "m1", NOW)
    out = await service.score_batch([fine, TxContext("late", TxKind.PURCHASE, "m1", NOW - timedelta(days=90))])
    assert isinstance(out[1], BadRequest) and out[1].field == "transactions[1].occurred_at"


@pytest.mark.parametrize("where", ["check", "decide"])
async def test_a_fault_on_one_row_of_a_batch_fails_that_row_alone(
    fraud_models: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug one row trips (in its checks, or in deciding it with the rest of its chunk) failed
    the whole ScoreBatch, and the ledger then decided every row of it unscored by policy."""
    service = FraudService(MemoryVelocity(), ModelSlot("fraud", fraud_models), ModelSlot("churn", fraud_models),
                           clock=ManualClock(NOW))  # fmt: skip
    real = getattr(fraud_service, where)

    def trips(ctx: TxContext, *args: Any, **kwargs: Any) -> Any:
        if ctx.device_id == "trips":
            raise ZeroDivisionError("division by zero")
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(fraud_service, where, trips)
    rows = [TxContext(f"r{i}", TxKind.PURCHASE, f"m{i}", NOW, device_id="trips" if i == 1 else "") for i in range(3)]
    out = await service.score_batch(rows)
    assert isinstance(out[1], RowFailed) and out[1].field == "transactions[1]"
    assert [type(out[i]).__name__ for i in (0, 2)] == ["Decision", "Decision"]


# 3. Amounts and points stay within what a Redis sum holds exactly.


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        pytest.param("transaction.amount.amount_minor",
                     {"amount": common_pb2.Money(amount_minor=MAX_AMOUNT_MINOR + 1, currency="EUR")}, id="amount"),
        pytest.param("transaction.points", {"points": MAX_POINTS + 1}, id="points"),
        pytest.param("transaction.balance_points", {"balance_points": MAX_POINTS + 1}, id="balance"),
        pytest.param("transaction.balance_points", {"balance_points": -MAX_POINTS - 1}, id="negative-balance"),
        pytest.param("transaction.points", {"points": 2**63 - 1}, id="points-int64-max"),
    ],
)  # fmt: skip
async def test_an_amount_past_the_platform_bound_is_refused_on_its_field(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock], field: str, fields: dict[str, object]
) -> None:
    _app, stub, _clock = served
    assert await refused_on(stub, tx(f"big-{field}", "m_big", **fields)) == field


async def test_the_largest_amounts_are_scored(
    served: tuple[FraudApp, fraud_pb2_grpc.FraudServiceStub, ManualClock],
) -> None:
    _app, stub, _clock = served
    got = await stub.Score(fraud_pb2.ScoreRequest(transaction=tx(
        "max", "m_max", amount=common_pb2.Money(amount_minor=MAX_AMOUNT_MINOR, currency="EUR"), points=MAX_POINTS,
        balance_points=-MAX_POINTS,
    )))  # fmt: skip
    assert got.event_id == "max"


@pytest.mark.parametrize("fetch_rows", [3, 32])
async def test_sums_past_2_to_the_53_are_exact_in_redis_as_in_memory(
    redis_server: RedisServer, fetch_rows: int
) -> None:
    """Lua sums in doubles: ten amounts just under 10**15 summed to an odd number past 2**53
    came back rounded from Redis while MemoryVelocity's integers were exact."""
    spec = TrackSpec((3_600_000,), (60_000, 3_600_000), want_prev=True, retention_ms=3_600_000)
    amounts = [MAX_AMOUNT_MINOR - i for i in range(1, 11)]
    client = Redis.from_url(redis_server.url)
    try:
        stores: list[Velocity] = [MemoryVelocity(), RedisVelocity(client, prefix=f"test:{uuid.uuid4().hex}:",
                                                                   fetch_rows=fetch_rows)]  # fmt: skip
        answers = []
        for velocity in stores:
            for i, amount in enumerate(amounts):
                last = await velocity.observe(f"e{i}", 1_760_000_000_000 + i * 1_000, [Track(spec, "m", amount, "",
                                                                                             True)], [])  # fmt: skip
            answers.append(last)
    finally:
        await client.aclose()

    assert answers[0] == answers[1]
    assert answers[1][:3] == (10, sum(amounts), sum(amounts))
    assert sum(amounts) > 2**53 and sum(amounts) % 2 == 1


# 5. A late event sees what happened before it.


def buy(eid: str, when: datetime, member: str = "m1", store: str = "s1") -> TxContext:
    return TxContext(eid, TxKind.PURCHASE, member, when, channel="pos", store_id=store, amount_minor=1000,
                     currency="EUR", points=10)  # fmt: skip


async def test_a_late_event_sees_the_30_days_before_it_after_newer_events(velocity: Velocity) -> None:
    """A day-31 event trimmed the day-0 purchase a receipt of day 29 (two hours late) still
    had in its 30 days; and a store's events of the day went with the next day's."""
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    before = [buy("e0", t), buy("e1", t + timedelta(days=29))]
    late = buy("late", t + timedelta(days=29, hours=23))
    newer = buy("newer", t + timedelta(days=30, hours=1))
    for ctx in before:
        await featurize(ctx, velocity)
    await featurize(newer, velocity)

    row = await featurize(late, velocity)

    assert row["member_purchases_30d"] == 3 and row["member_purchase_amount_30d"] == 3000


async def test_a_receipt_as_late_as_kept_exactly_sees_its_stores_day(velocity: Velocity) -> None:
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    for i in range(3):
        await featurize(buy(f"day-{i}", t + timedelta(minutes=75 * i), member=f"m{i}", store="busy"), velocity)
    await featurize(buy("today", t + EXACT_LATENESS, member="m9", store="busy"), velocity)

    late = await featurize(buy("late", t + timedelta(hours=3), member="m8", store="busy"), velocity)

    assert late["store_events_24h"] == 4 and late["store_events_1h"] == 2


async def test_a_late_event_finds_its_previous_event_after_newer_ones(velocity: Velocity) -> None:
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    await featurize(buy("first", t), velocity)
    await featurize(buy("newer", t + timedelta(days=31)), velocity)  # trimmed "first" before

    late = await featurize(buy("late", t + timedelta(days=2)), velocity)

    assert late["member_hours_since_last_event"] == 48.0


async def test_keeping_entries_longer_changes_no_answer_in_event_order(velocity: Velocity) -> None:
    """Entries are kept past the retention for late events only: in order, "hours since the
    previous event" still ends 30 days back (the recording trimmed it), and a redemption read
    by a purchase still answers however old it is, as the model was trained."""
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    await featurize(TxContext("redeem", TxKind.REDEMPTION, "m1", t, points=100, balance_points=500), velocity)
    await featurize(buy("old", t + timedelta(hours=1)), velocity)
    gap = await featurize(buy("new", t + timedelta(days=31, hours=1)), velocity)
    near = await featurize(buy("near", t + timedelta(days=31, hours=6)), velocity)

    assert math.isnan(gap["member_hours_since_last_event"])
    assert near["member_hours_since_last_event"] == 5.0
    assert near["member_hours_since_redemption"] == 31 * 24 + 6
