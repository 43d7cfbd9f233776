"""The outbox delivers every event across a Redis outage, the balance cache never serves a
superseded balance, and WatchEvents streams a member's events in order from a resumable position.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ledger_svc import accrual, codec
from ledger_svc import server as ledger_server
from ledger_svc.cache import cache_key
from ledger_svc.domain import Balance
from ledger_svc.outbox import OutboxRelay
from ledger_svc.store.base import ShardTx
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.clock import ManualClock
from pointmesh.events import LEDGER_EVENTS, BusMessage, RedisStreamBus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger

GROUP = "test-consumer"
# A ledger stop that hangs (see the relay cancellation bug at the end) fails its test, not the run.
STOP_TIMEOUT_SECONDS = 20.0
# A posting must answer well within this even while Redis is down or frozen.
POSTING_DEADLINE_SECONDS = 2.0


def _key(name: str) -> common_pb2.IdempotencyKey:
    return common_pb2.IdempotencyKey(namespace="outbox-cache-test", key=name)


async def _stop(ledger: LedgerUnderTest) -> None:
    await asyncio.wait_for(stop_ledger(ledger), STOP_TIMEOUT_SECONDS)


@pytest.fixture
async def bounded_ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """The conftest `ledger`, with a bounded stop."""
    running = await start_ledger(tmp_path / "data", redis_server.url)
    yield running
    await _stop(running)


def _client(url: str) -> Redis:
    return Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))


async def _create_member(ledger: LedgerUnderTest, name: str) -> str:
    response = await ledger.stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=_key(name)))
    return str(response.member.member_id)


async def _earn(ledger: LedgerUnderTest, member_id: str, points: int, key: str) -> ledger_pb2.EarnResponse:
    request = ledger_pb2.EarnRequest(idempotency_key=_key(key), member_id=member_id, points=points)
    return await ledger.stub.Earn(request, timeout=POSTING_DEADLINE_SECONDS)


async def _balance(ledger: LedgerUnderTest, member_id: str) -> ledger_pb2.Balance:
    return (await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))).balance


async def _outbox_backlog(ledger: LedgerUnderTest) -> int:
    store = ledger.app.store
    return sum([await store.read(shard, lambda tx: tx.outbox_backlog()) for shard in range(store.shard_count)])


async def _stream_events(client: Redis, member_id: str) -> list[ledger_pb2.LedgerEvent]:
    raw = await client.xrange(LEDGER_EVENTS)
    return [
        ledger_pb2.LedgerEvent.FromString(fields[b"payload"])
        for _pos, fields in raw
        if fields.get(b"key", b"").decode() == member_id
    ]


class IdempotentConsumer:
    """Applies each event once, however often the bus delivers it."""

    def __init__(self, member_id: str) -> None:
        self.member_id = member_id
        self.applied: dict[str, ledger_pb2.LedgerEvent] = {}
        self.balance_points = 0
        self.deliveries = 0

    def apply(self, messages: list[BusMessage]) -> None:
        for message in messages:
            self.deliveries += 1
            if message.key != self.member_id or message.event_type != "points_earned":
                continue
            if message.event_id in self.applied:
                continue
            event = ledger_pb2.LedgerEvent.FromString(message.payload)
            assert event.event_id == message.event_id
            self.applied[event.event_id] = event
            self.balance_points += event.points_earned.points


async def test_outbox_delivers_every_event_exactly_once_to_an_idempotent_consumer_across_a_redis_outage(
    tmp_path: Path,
) -> None:
    own_redis = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
    own_redis.start()
    client = _client(own_redis.url)
    ledger: LedgerUnderTest | None = None
    try:
        bus = RedisStreamBus(client)
        await bus.ensure_group(LEDGER_EVENTS, GROUP, start="0")
        ledger = await start_ledger(tmp_path / "data", own_redis.url)
        member_id = await _create_member(ledger, "outage-member")
        tx_ids = [(await _earn(ledger, member_id, i + 1, f"earn-{i}")).transaction.transaction_id for i in range(20)]

        own_redis.stop()
        for i in range(20, 50):
            started = time.monotonic()
            earned = await _earn(ledger, member_id, i + 1, f"earn-{i}")
            assert time.monotonic() - started < POSTING_DEADLINE_SECONDS
            tx_ids.append(earned.transaction.transaction_id)
        assert await _outbox_backlog(ledger) > 0

        own_redis.start()
        # The test's own connection died with the old process; the relay reconnects by itself.
        await client.aclose()
        client = _client(own_redis.url)
        bus = RedisStreamBus(client)
        deadline = time.monotonic() + 20
        while len({e.event_id for e in await _stream_events(client, member_id)}) < 50:
            assert time.monotonic() < deadline, "the relay did not catch up after Redis came back"
            await asyncio.sleep(0.05)
        while await _outbox_backlog(ledger):
            assert time.monotonic() < deadline, "outbox rows stay unrelayed"
            await asyncio.sleep(0.05)

        consumer = IdempotentConsumer(member_id)
        worker = bus.group(LEDGER_EVENTS, GROUP, "worker-1")
        # The consumer applies a batch and dies before acknowledging: the bus delivers it again.
        first = await worker.poll(max_messages=10, block_ms=100)
        assert first
        consumer.apply(first)
        await worker.close()
        worker = bus.group(LEDGER_EVENTS, GROUP, "worker-1")  # restarted under its name
        redelivered = await worker.poll(max_messages=10, block_ms=100)
        assert [m.position for m in redelivered] == [m.position for m in first]
        consumer.apply(redelivered)
        await worker.commit(redelivered)
        while batch := await worker.poll(max_messages=7, block_ms=100):
            consumer.apply(batch)
            await worker.commit(batch)

        assert consumer.deliveries >= 50 + len(first)
        assert len(consumer.applied) == 50
        assert sorted(e.points_earned.transaction_id for e in consumer.applied.values()) == sorted(tx_ids)
        balance = await _balance(ledger, member_id)
        assert consumer.balance_points == balance.balance_points == sum(range(1, 51))
        assert max(e.balance_after.version for e in consumer.applied.values()) == balance.version
        assert (await client.xpending(LEDGER_EVENTS, GROUP))["pending"] == 0
        assert await _outbox_backlog(ledger) == 0
    finally:
        if ledger is not None:
            await _stop(ledger)
        await client.aclose()
        own_redis.stop()


async def _wait_for_cache_fill(ledger: LedgerUnderTest, client: Redis, member_id: str, version: int) -> str:
    """Reads until the read-through cache holds this version; returns the raw entry."""
    deadline = time.monotonic() + 10
    while True:
        await _balance(ledger, member_id)
        raw = await client.get(cache_key(member_id, "points"))
        if raw is not None and raw.decode().startswith(f"{version}|{{"):
            return str(raw.decode())
        assert time.monotonic() < deadline, f"no cache entry for version {version}; found {raw!r}"
        await asyncio.sleep(0.02)


async def _read_for_a_second(ledger: LedgerUnderTest, member_id: str) -> list[int]:
    seen = []
    for _ in range(20):
        seen.append((await _balance(ledger, member_id)).balance_points)
        await asyncio.sleep(0.05)
    return seen


async def test_balance_cache_never_serves_a_superseded_balance_after_a_redis_freeze_or_a_restart(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = _client(redis_server.url)
    ledger = await start_ledger(tmp_path / "data", redis_server.url)
    paused = False
    try:
        member_id = await _create_member(ledger, "cache-member")
        earned = await _earn(ledger, member_id, 100, "cache-earn-1")
        entry = await _wait_for_cache_fill(ledger, client, member_id, earned.transaction.balance_after.version)
        assert '"balance_points": 100' in entry or '"balance_points":100' in entry
        assert (await _balance(ledger, member_id)).balance_points == 100

        redis_server.pause()
        paused = True
        started = time.monotonic()
        earned = await _earn(ledger, member_id, 50, "cache-earn-2")
        assert time.monotonic() - started < POSTING_DEADLINE_SECONDS
        # Reads while Redis is frozen skip the cache for the member just written.
        assert (await _balance(ledger, member_id)).balance_points == 150
        redis_server.resume()
        paused = False
        assert (await _balance(ledger, member_id)).balance_points == 150
        assert set(await _read_for_a_second(ledger, member_id)) == {150}
        stale_entry = await _wait_for_cache_fill(ledger, client, member_id, earned.transaction.balance_after.version)

        # Redis freezes during a write and the process stops before the tombstone lands, so
        # the entry of a superseded balance may outlive the process.
        redis_server.pause()
        paused = True
        earned = await _earn(ledger, member_id, 25, "cache-earn-3")
        await _stop(ledger)
        redis_server.resume()
        paused = False
        await client.set(cache_key(member_id, "points"), stale_entry, ex=300)

        ledger = await start_ledger(tmp_path / "data", redis_server.url)
        assert (await _balance(ledger, member_id)).balance_points == 175
        assert set(await _read_for_a_second(ledger, member_id)) == {175}
        await _wait_for_cache_fill(ledger, client, member_id, earned.transaction.balance_after.version)
        assert (await _balance(ledger, member_id)).balance_points == 175
    finally:
        if paused:
            redis_server.resume()
        await _stop(ledger)
        await client.aclose()


async def _next(stream: AsyncIterator[ledger_pb2.WatchEventsResponse]) -> ledger_pb2.WatchEventsResponse:
    return await asyncio.wait_for(anext(stream), timeout=10)


def _position(value: str) -> tuple[int, int]:
    millis, _, seq = value.partition("-")
    return int(millis), int(seq)


async def test_watch_events_streams_a_members_events_in_order_and_resumes_after_a_position(
    bounded_ledger: LedgerUnderTest, redis_server: RedisServer
) -> None:
    ledger = bounded_ledger
    client = _client(redis_server.url)
    try:
        last = await client.xrevrange(LEDGER_EVENTS, count=1)
        start = last[0][0].decode() if last else "0-0"
    finally:
        await client.aclose()
    member_id = await _create_member(ledger, "watch-member")
    other_id = await _create_member(ledger, "watch-other")
    await _earn(ledger, member_id, 80, "watch-earn-1")
    await _earn(ledger, other_id, 7, "watch-other-earn")
    redeemed = await ledger.stub.Redeem(
        ledger_pb2.RedeemRequest(idempotency_key=_key("watch-redeem-1"), member_id=member_id, points=30)
    )

    call = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member_id, after_position=start))
    stream = aiter(call)
    try:
        earned_msg, redeemed_msg = await _next(stream), await _next(stream)
    finally:
        call.cancel()
    assert earned_msg.event.WhichOneof("payload") == "points_earned"
    assert (earned_msg.event.member_id, earned_msg.event.points_earned.points) == (member_id, 80)
    assert earned_msg.event.balance_after.balance_points == 80
    assert redeemed_msg.event.WhichOneof("payload") == "points_redeemed"
    assert redeemed_msg.event.points_redeemed.points == 30
    assert redeemed_msg.event.points_redeemed.transaction_id == redeemed.transaction.transaction_id
    assert redeemed_msg.event.balance_after.balance_points == 50
    assert _position(start) < _position(earned_msg.position) < _position(redeemed_msg.position)

    await _earn(ledger, member_id, 5, "watch-earn-2")
    resumed = ledger.stub.WatchEvents(
        ledger_pb2.WatchEventsRequest(member_id=member_id, after_position=earned_msg.position)
    )
    stream = aiter(resumed)
    try:
        again, newest = await _next(stream), await _next(stream)
    finally:
        resumed.cancel()
    assert (again.position, again.event.event_id) == (redeemed_msg.position, redeemed_msg.event.event_id)
    assert newest.event.WhichOneof("payload") == "points_earned"
    assert newest.event.points_earned.points == 5
    assert newest.event.balance_after.balance_points == 55
    assert _position(newest.position) > _position(redeemed_msg.position)


async def test_watch_events_rejects_a_malformed_member_id(bounded_ledger: LedgerUnderTest) -> None:
    ledger = bounded_ledger
    call = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id="not-a-member"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(anext(aiter(call)), timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("position", ["yesterday", "\u0661\u0662\u0663", "99999999999999999999-0"])
async def test_watch_events_rejects_a_position_the_bus_never_gave(
    bounded_ledger: LedgerUnderTest, position: str
) -> None:
    """Words, digits of other scripts, numbers past 64 bits: INVALID_ARGUMENT naming the field."""
    call = bounded_ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(after_position=position))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(anext(aiter(call)), timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_position" in (failed.value.details() or "") and position in (failed.value.details() or "")


async def test_outbox_relay_ends_when_cancelled_just_as_a_posting_wakes_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    ledger = await start_ledger(tmp_path / "data", redis_server.url, outbox_poll_seconds=3600.0)
    relay = next(task for task in ledger.app.tasks if task.get_name() == "outbox-relay")
    try:
        await asyncio.sleep(0.2)  # the relay drained once and now waits to be woken
        # A posting commits and wakes the relay in the very turn shutdown cancels it.
        ledger.app.service.outbox_wakeup.set()
        await asyncio.sleep(0)
        relay.cancel()
        await asyncio.wait({relay}, timeout=2)
        assert relay.done(), f"the relay ignored its cancellation (cancelling={relay.cancelling()})"
    finally:
        await _stop(ledger)


async def test_spending_screens_on_the_stored_balance_never_the_cache(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A cache entry saying the member has nothing (planted with the current version, as a
    lost tombstone could leave one) must not reach a redemption's fraud screening: there it
    would send the spend down the 'balance short' policy instead of the one it meets. fraud_svc
    is away here, so the screening says which policy decided."""
    client = _client(redis_server.url)
    ledger = await start_ledger(tmp_path / "data", redis_server.url, fraud_screening=True,
                                fraud_addr=f"127.0.0.1:{free_port()}")  # fmt: skip
    try:
        member_id = await _create_member(ledger, "screened-spender")
        earned = await _earn(ledger, member_id, 100, "screened-earn")
        entry = await _wait_for_cache_fill(ledger, client, member_id, earned.transaction.balance_after.version)
        empty = entry.replace('"balance_points":100,', '"balance_points":0,')
        assert empty != entry
        await client.set(cache_key(member_id, "points"), empty, ex=300)

        spent = await ledger.stub.Redeem(
            ledger_pb2.RedeemRequest(idempotency_key=_key("screened-redeem"), member_id=member_id, points=10)
        )

        assert not spent.screening.scored
        assert [r.split(":")[1] for r in spent.screening.reasons] == ["fraud_svc_unavailable"]
    finally:
        await stop_ledger(ledger)
        await client.aclose()


@pytest.mark.parametrize("schema", ["pointmesh.v1/1", "pointmesh.v1/99"], ids=["garbage-bytes", "unknown-major"])
async def test_watch_events_skips_an_event_it_cannot_read_and_goes_on(
    bounded_ledger: LedgerUnderTest, redis_server: RedisServer, schema: str
) -> None:
    """An entry that does not parse (or is of a schema this ledger does not know) is skipped:
    it must not end the watch, nor every watch resumed from before it."""
    ledger = bounded_ledger
    member_id = await _create_member(ledger, f"watch-skip-{schema[-2:]}")
    client = _client(redis_server.url)
    try:
        last = await client.xrevrange(LEDGER_EVENTS, count=1)
        start = last[0][0].decode() if last else "0-0"
        await client.xadd(LEDGER_EVENTS, {"key": member_id, "event_id": "ev-odd", "type": "PointsEarned",
                                          "payload": b"\xff\xff\xff\xff", "schema": schema})  # fmt: skip
    finally:
        await client.aclose()
    await _earn(ledger, member_id, 9, f"watch-skip-earn-{schema[-2:]}")

    call = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member_id, after_position=start))
    try:
        got = await _next(aiter(call))
    finally:
        call.cancel()

    assert got.event.WhichOneof("payload") == "points_earned" and got.event.points_earned.points == 9


async def test_watches_past_the_most_a_process_serves_are_refused_until_one_ends(
    bounded_ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each watch holds a connection of the ledger's one bus client, which the outbox relay
    publishes through: a flood of watches must not take them all. Past the most (2 here), a
    watch is refused RESOURCE_EXHAUSTED; once one ends, a new one is served."""
    monkeypatch.setattr(ledger_server, "MAX_WATCHES", 2)
    ledger = bounded_ledger
    member_id = await _create_member(ledger, "watch-cap")
    calls = [ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member_id)) for _ in range(2)]
    try:
        streams = [aiter(call) for call in calls]
        reads = [asyncio.ensure_future(_next(stream)) for stream in streams]
        await asyncio.sleep(0.5)  # both watches are waiting for the member's next event
        await _earn(ledger, member_id, 3, "watch-cap-earn-1")
        assert [(await read).event.points_earned.points for read in reads] == [3, 3]
        refused = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member_id))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _next(aiter(refused))
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 event watches" in (failed.value.details() or "")
        calls[0].cancel()
        for _ in range(50):  # the ended watch is let go once its handler has seen the cancel
            calls[0] = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member_id))
            read = asyncio.ensure_future(_next(aiter(calls[0])))
            await asyncio.sleep(0.1)
            if not read.done():
                break  # accepted: waiting for the member's next event
            assert isinstance(read.exception(), grpc.aio.AioRpcError)
        await _earn(ledger, member_id, 4, "watch-cap-earn-2")
        assert (await read).event.points_earned.points == 4
    finally:
        for call in calls:
            call.cancel()


async def test_a_purchase_line_too_long_for_its_event_is_refused_naming_it(ledger: LedgerUnderTest) -> None:
    """400 lines, each its own 3,000-character category (gRPC takes 16 MiB): recorded, its
    purchase_recorded event was 1.2 MB, over what the bus takes, and the relay retried it for
    ever, so no later event of its shard, nor of any shard after it, went out."""
    member = (await ledger.stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=_key("long")))).member
    line = ledger_pb2.PurchaseLine(sku="s", category="c" * 65, quantity=1,
                                   amount=common_pb2.Money(amount_minor=100, currency="EUR"))  # fmt: skip
    request = ledger_pb2.RecordPurchaseRequest(
        member_id=member.member_id, channel="pos", store_id="HEL-01", receipt_id="long-1",
        total=common_pb2.Money(amount_minor=200, currency="EUR"),
        lines=[ledger_pb2.PurchaseLine(sku="s", category="misc", quantity=1, amount=line.amount), line],
    )  # fmt: skip
    request.receipt_time.FromDatetime(ledger.clock.now())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ledger.stub.RecordPurchase(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("lines[1].category: at most 64 characters, got 65")


async def test_a_receipt_recorded_before_lines_were_bounded_still_replays(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry answers as the first time: the bound holds new receipts only."""
    member = (await ledger.stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=_key("old")))).member
    amount = common_pb2.Money(amount_minor=100, currency="EUR")
    request = ledger_pb2.RecordPurchaseRequest(
        member_id=member.member_id, channel="pos", store_id="HEL-01", receipt_id="old-1", total=amount,
        lines=[ledger_pb2.PurchaseLine(sku="s" * 80, category="misc", quantity=1, amount=amount)],
    )  # fmt: skip
    request.receipt_time.FromDatetime(ledger.clock.now())
    with monkeypatch.context() as before_the_bound:
        before_the_bound.setattr(accrual, "MAX_LINE_TEXT", 10_000)
        first = await ledger.stub.RecordPurchase(request)
    again = await ledger.stub.RecordPurchase(request)
    assert again.replayed and again.purchase.purchase_id == first.purchase.purchase_id


async def test_an_event_no_bus_takes_is_set_aside_and_the_relay_goes_on(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A row written before postings were bounded (or by a bug): its event is over the bus's
    limit. The relay published none of its batch and retried for ever; now it is logged and
    counted, and the events beside it go out."""
    store = SqliteLedgerStore(tmp_path / "ledger", 1)
    redis = Redis.from_url(redis_server.url)
    clock = ManualClock()
    try:

        def rows(tx: ShardTx) -> None:
            for n, reference in enumerate(("x" * 1_100_000, "fits", "fits too")):
                payload = {"event_id": f"ev_big{n}", "type": "points_adjusted", "occurred_at": clock.now().isoformat(),
                           "member_id": "m_1", "unit": "points",
                           "balance": codec.to_plain(Balance("m_1", "points", 0, 0, 0, 0, 0, n + 1)),
                           "data": {"transaction_id": f"tx_{n}", "points": 1, "reason": reference, "operator_id": "o"}}  # fmt: skip
                tx.add_outbox(f"ev_big{n}", "m_1", codec.dumps_plain(payload), clock.now())

        await store.write(0, rows)
        stream = f"test.oversize.{tmp_path.name}"
        relay = OutboxRelay(store, RedisStreamBus(redis), clock, asyncio.Event(), stream=stream)
        assert await relay.relay_once() == 3
        published = [fields[b"event_id"] for _id, fields in await redis.xrange(stream)]
        assert published == [b"ev_big1", b"ev_big2"]
        assert await store.read(0, lambda tx: tx.unrelayed_outbox(10)) == []
    finally:
        await redis.aclose()
        await store.close()
