"""One conformance suite for both event buses: Redis Streams (the embedded default) and a real
Apache Kafka broker started from the Maven-resolved jars. Each test uses its own topics."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from pointmesh import consumers
from pointmesh.consumers import Poison, consumer_name, in_order, run_group
from pointmesh.events import BusMessage, EventBus, OutgoingEvent, RedisStreamBus, dead_letter_topic
from pointmesh.kafka_bus import KafkaBus
from pointmesh.kafka_server import KafkaServer
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2
from tests.conftest import start_kafka
from tests.waiting import until

CLAIM_IDLE_MS = 300  # Redis: how long an unacknowledged message waits before another consumer takes it


def new_topic() -> str:
    return f"test.{uuid.uuid4().hex[:10]}"


def event(key: str, n: int, *, schema: str = "pointmesh.v1/1", payload: bytes | None = None) -> OutgoingEvent:
    body = payload if payload is not None else common_pb2.OpsAlert(alert_id=f"{key}-{n}", kind="k").SerializeToString()
    return OutgoingEvent(key, f"{key}-{n}", "ops_alert", body, schema)


@pytest.fixture(params=["redis", "kafka"])
async def bus(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[EventBus]:
    if request.param == "redis":
        made: EventBus = RedisStreamBus(Redis.from_url(redis_server.url), claim_idle_ms=CLAIM_IDLE_MS, owns_client=True)
    else:
        made = KafkaBus(request.getfixturevalue("kafka_bootstrap"), partitions=3)
    yield made
    await made.close()


async def drain(bus: EventBus, topic: str, group: str, consumer: str, want: int) -> list[BusMessage]:
    """Reads and commits until `want` messages came (30 s at most)."""
    member = bus.group(topic, group, consumer)
    got: list[BusMessage] = []
    try:
        async with asyncio.timeout(30):
            while len(got) < want:
                batch = await member.poll(max_messages=50, block_ms=200)
                got += batch
                await member.commit(batch)
    finally:
        await member.close()
    return got


async def test_events_of_one_key_arrive_in_the_order_they_were_published(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    keys = ["m_a", "m_b", "m_c", "m_d"]
    await bus.publish(topic, [event(keys[i % 4], i) for i in range(80)])
    got = await drain(bus, topic, "g-order", "c1", 80)
    assert sorted(m.event_id for m in got) == sorted(f"{keys[i % 4]}-{i}" for i in range(80))
    for k in keys:
        seen = [int(m.event_id.split("-")[1]) for m in got if m.key == k]
        assert seen == sorted(seen) and len(seen) == 20
    assert all(m.schema_major == 1 and m.event_type == "ops_alert" for m in got)


async def test_every_group_gets_every_event_and_the_members_of_a_group_share_them(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    await bus.publish(topic, [event(f"m_{i % 9}", i) for i in range(60)])
    analytics = await drain(bus, topic, "analytics", "a1", 60)
    assert len({m.event_id for m in analytics}) == 60

    first, second = bus.group(topic, "warehouse", "w1"), bus.group(topic, "warehouse", "w2")
    seen: dict[str, set[str]] = {"w1": set(), "w2": set()}

    async def work(name: str, member: object) -> None:
        async with asyncio.timeout(30):
            while len(seen["w1"] | seen["w2"]) < 60:
                batch = await member.poll(max_messages=5, block_ms=200)  # type: ignore[attr-defined]
                seen[name] |= {m.event_id for m in batch}
                await member.commit(batch)  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)

    try:
        await asyncio.gather(work("w1", first), work("w2", second))
    finally:
        await first.close()
        await second.close()
    assert len(seen["w1"] | seen["w2"]) == 60


async def test_what_a_consumer_read_but_never_committed_comes_again_and_takes_effect_once(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    await bus.publish(topic, [event(f"m_{i % 5}", i) for i in range(30)])
    effects: dict[str, int] = {}

    def apply(messages: list[BusMessage]) -> None:
        for m in messages:  # the handler's own dedupe by event id
            effects[m.event_id] = effects.get(m.event_id, 0) + (m.event_id not in effects)

    doomed = bus.group(topic, "points-paid", "doomed")
    read: list[BusMessage] = []
    async with asyncio.timeout(30):
        while not read:
            read = await doomed.poll(max_messages=10, block_ms=200)
    apply(read)  # ... the effect happened, then the consumer died before committing
    await doomed.close()
    await asyncio.sleep(CLAIM_IDLE_MS / 1000 + 0.1)

    again = await drain(bus, topic, "points-paid", "survivor", 30)
    apply(again)
    assert {m.event_id for m in read} <= {m.event_id for m in again}  # redelivered, nothing lost
    assert set(effects) == {f"m_{i % 5}-{i}" for i in range(30)} and set(effects.values()) == {1}


async def test_a_poison_message_goes_to_the_dead_letter_topic_and_the_group_moves_on(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    await bus.publish(topic, [
        event("m_p", 1), event("m_p", 2, schema="pointmesh.v1/2"), event("m_p", 3, payload=b"\\xff\\x00 not protobuf"),
        event("m_p", 4),
    ])  # fmt: skip
    handled: list[str] = []

    async def handle(message: BusMessage) -> None:
        try:
            alert = common_pb2.OpsAlert.FromString(message.payload)
        except Exception as exc:
            raise Poison(f"undecodable OpsAlert: {exc}") from exc
        handled.append(alert.alert_id)

    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_group(bus, topic, "alerts", "c1", in_order(bus, topic, "alerts", handle), stop=stop, block_ms=200)
    )
    dead = await drain(bus, dead_letter_topic(topic), "dlq-reader", "r1", 2)
    await until(lambda: len(handled) >= 2, 20)
    stop.set()
    await runner
    assert handled == ["m_p-1", "m_p-4"]
    reasons = {m.event_id: dict(m.headers)["dlq_reason"] for m in dead}
    assert "schema major version 2 is unknown" in reasons["m_p-2"]
    assert reasons["m_p-3"].startswith("undecodable OpsAlert")
    assert all(dict(m.headers)["dlq_source"] == topic for m in dead)


async def test_a_message_that_keeps_failing_the_same_way_is_dead_lettered_and_an_outage_is_waited_out(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or a bad value the schema check let through (ValueError on every attempt) must not
    stop the group for ever; a service that is down (ConnectionError) must never send good
    messages to the dead-letter topic, however long it takes."""
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    await bus.publish(topic, [event("m_d", n) for n in range(1, 5)])
    handled: set[str] = set()
    outage = [consumers.MAX_DETERMINISTIC_ATTEMPTS + 3]  # attempts that find the service down

    async def handle(message: BusMessage) -> None:
        if message.event_id == "m_d-2":
            raise ValueError("points must fit in int64")
        if message.event_id == "m_d-4" and outage[0] > 0:
            outage[0] -= 1
            raise ConnectionError("ledger unavailable")
        handled.add(message.event_id)

    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_group(bus, topic, "g", "c1", in_order(bus, topic, "g", handle), stop=stop, block_ms=100)
    )
    dead = await drain(bus, dead_letter_topic(topic), "dlq-reader", "r1", 1)
    await until(lambda: "m_d-4" in handled, 30)
    stop.set()
    await runner
    assert handled == {"m_d-1", "m_d-3", "m_d-4"}
    assert [m.event_id for m in dead] == ["m_d-2"]
    reason = dict(dead[0].headers)["dlq_reason"]
    assert reason == f"failed {consumers.MAX_DETERMINISTIC_ATTEMPTS} times: ValueError: points must fit in int64"


async def test_rewinding_a_group_to_a_time_replays_from_there(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    await bus.publish(topic, [event("m_r", i) for i in range(10)])
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await bus.publish(topic, [event("m_r", i) for i in range(10, 25)])
    assert len(await drain(bus, topic, "gamification", "g1", 25)) == 25
    await bus.rewind(topic, "gamification", since)
    replayed = await drain(bus, topic, "gamification", "g1", 15)
    assert [m.event_id for m in replayed] == [f"m_r-{i}" for i in range(10, 25)]


async def test_rewinding_a_group_to_a_time_before_1970_replays_everything(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic])
    await bus.publish(topic, [event("m_o", i) for i in range(3)])
    assert len(await drain(bus, topic, "g", "c1", 3)) == 3
    await bus.rewind(topic, "g", datetime(1969, 12, 31, tzinfo=UTC))
    assert [m.event_id for m in await drain(bus, topic, "g", "c1", 3)] == [f"m_o-{i}" for i in range(3)]


async def test_rewinding_a_group_to_a_future_time_delivers_what_comes_next(bus: EventBus) -> None:
    """A mistyped `--from` in the future must not skip (and, on Redis, let the trim delete)
    the events that follow."""
    topic = new_topic()
    await bus.ensure_topics([topic])
    await bus.publish(topic, [event("m_f", i) for i in range(3)])
    assert len(await drain(bus, topic, "gamification", "g1", 3)) == 3
    await bus.rewind(topic, "gamification", datetime.now(UTC) + timedelta(days=1))
    await bus.publish(topic, [event("m_f", i) for i in range(3, 8)])

    later = await drain(bus, topic, "gamification", "g1", 5)

    assert [m.event_id for m in later] == [f"m_f-{i}" for i in range(3, 8)]


async def test_the_dead_letter_copy_keeps_the_messages_own_headers(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    traced = OutgoingEvent("m_h", "m_h-1", "ops_alert", b"\xff not protobuf", "pointmesh.v1/1",
                           headers=(("traceparent", "00-abc-def-01"), ("source_file", "pos-0412.csv")))  # fmt: skip
    await bus.publish(topic, [traced])

    async def handle(message: BusMessage) -> None:
        raise Poison("undecodable")

    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_group(bus, topic, "alerts", "c1", in_order(bus, topic, "alerts", handle), stop=stop, block_ms=200)
    )
    (dead,) = await drain(bus, dead_letter_topic(topic), "dlq-reader", "r1", 1)
    stop.set()
    await runner

    headers = dict(dead.headers)
    assert (headers["traceparent"], headers["source_file"]) == ("00-abc-def-01", "pos-0412.csv")
    assert headers["dlq_reason"] == "undecodable" and int(headers["dlq_timestamp_ms"]) > 0


async def test_a_failing_key_lets_the_other_keys_chains_finish_before_the_batch_is_read_again() -> None:
    running: dict[str, int] = {}
    finished: list[str] = []

    async def handle(message: BusMessage) -> None:
        running[message.key] = running.get(message.key, 0) + 1
        try:
            if message.key == "a":
                raise ConnectionError("the ledger is away")
            await asyncio.sleep(0.05)
            finished.append(message.event_id)
        finally:
            running[message.key] -= 1

    batch = [BusMessage(f"1-{i}", key, f"{key}{i}", "t", b"", "pointmesh.v1/1") for i, key in enumerate("abbb")]
    with pytest.raises(ConnectionError):
        await consumers.by_key(None, "t", "g", handle)(batch)  # type: ignore[arg-type]

    assert finished == ["b1", "b2", "b3"] and running == {"a": 0, "b": 0}


@dataclass
class Restartable:
    bus: EventBus
    stop: Callable[[], None]
    start: Callable[[], None]


@pytest.fixture(params=["redis", "kafka"])
async def own_broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Restartable]:
    """A broker of this test's own, so stopping it disturbs no other test."""
    if request.param == "redis":
        redis = RedisServer(free_port(), tmp_path / "redis")
        redis.start()
        bus: EventBus = RedisStreamBus(Redis.from_url(redis.url), claim_idle_ms=CLAIM_IDLE_MS, owns_client=True)
        yield Restartable(bus, redis.stop, redis.start)
        await bus.close()
        redis.stop()
        return
    kafka = start_kafka(tmp_path / "kafka")
    assert isinstance(kafka, KafkaServer)
    bus = KafkaBus(kafka.bootstrap, partitions=2)
    yield Restartable(bus, kafka.stop, lambda: kafka.start())  # type: ignore[arg-type,return-value]
    await bus.close()
    kafka.stop()


async def publish_until_accepted(bus: EventBus, topic: str, events: list[OutgoingEvent]) -> None:
    """What the outbox relay does: a batch the bus refused is sent again until it is accepted."""
    async with asyncio.timeout(60):
        while True:
            try:
                await bus.publish(topic, events)
                return
            except Exception:
                await asyncio.sleep(0.2)


async def test_a_broker_stopped_and_restarted_mid_stream_loses_nothing(own_broker: Restartable) -> None:
    bus, topic = own_broker.bus, new_topic()
    await bus.ensure_topics([topic])
    received: dict[str, BusMessage] = {}

    async def handle(message: BusMessage) -> None:
        received[message.event_id] = message

    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_group(bus, topic, "live", "c1", in_order(bus, topic, "live", handle), stop=stop, block_ms=200)
    )
    await publish_until_accepted(bus, topic, [event(f"m_{i % 3}", i) for i in range(40)])
    await until(lambda: len(received) >= 40, 30)
    await asyncio.to_thread(own_broker.stop)
    await asyncio.to_thread(own_broker.start)
    await publish_until_accepted(bus, topic, [event(f"m_{i % 3}", i) for i in range(40, 80)])
    await until(lambda: len(received) >= 80, 60)
    stop.set()
    await runner
    assert set(received) == {f"m_{i % 3}-{i}" for i in range(80)}


async def test_the_redis_stream_never_trims_what_a_group_has_not_acknowledged(redis_server: RedisServer) -> None:
    """A backlog past the length cap (a big ingest file, a consumer down for a while) waits for
    its group; once acknowledged, the stream shrinks back to the newest `maxlen`."""
    redis = Redis.from_url(redis_server.url)
    bus = RedisStreamBus(redis, maxlen=200, trim_every=50, claim_idle_ms=CLAIM_IDLE_MS, owns_client=True)
    topic = new_topic()
    try:
        assert await bus.group(topic, "slow", "c1").poll(block_ms=10) == []  # it reads, and has read nothing
        for start in range(0, 2000, 100):
            await bus.publish(topic, [event("m1", n) for n in range(start, start + 100)])
        assert await redis.xlen(topic) == 2000  # nothing read yet: nothing dropped
        got = await drain(bus, topic, "slow", "c1", 2000)
        assert [m.event_id for m in got] == [f"m1-{n}" for n in range(2000)]
        await bus.publish(topic, [event("m1", n) for n in range(2000, 2050)])
        assert 200 <= await redis.xlen(topic) <= 250  # all acknowledged: back to about the cap
        # Publishers trimming at once (several ledger pods) never cut below the cap.
        others = [RedisStreamBus(redis, maxlen=200, trim_every=1) for _ in range(4)]
        await bus.publish(topic, [event("m1", n) for n in range(2050, 2450)])
        assert len(await drain(bus, topic, "slow", "c1", 450)) == 450
        await asyncio.gather(*(b.trim(topic) for b in others))
        assert await redis.xlen(topic) >= 200
        # A group nobody reads (a rewind under a mistyped name) does not hold the stream.
        await bus.rewind(topic, "slwo", datetime(2000, 1, 1, tzinfo=UTC))
        await bus.publish(topic, [event("m1", n) for n in range(2450, 2850)])
        assert len(await drain(bus, topic, "slow", "c1", 400)) == 400
        await bus.trim(topic)
        assert 200 <= await redis.xlen(topic) <= 250
    finally:
        await bus.close()


async def test_the_redis_trim_compares_ids_exactly_past_what_a_double_holds(redis_server: RedisServer) -> None:
    """Stream ids with a millisecond part past 2^53 (given explicitly once, every later id
    inherits it): a trim must drop exactly the acknowledged ones, never the undelivered."""
    redis = Redis.from_url(redis_server.url)
    bus = RedisStreamBus(redis, maxlen=1, trim_every=10**9, owns_client=True)
    topic, m = new_topic(), 2**53 + 3
    try:
        ids = [f"{m}-0", f"{m}-1", f"{m}-2", f"{m + 1}-0", f"{m + 2}-0"]
        for n, stream_id in enumerate(ids):
            await redis.xadd(topic, {"key": "k", "event_id": f"e{n}", "type": "t", "payload": b"", "schema": "pointmesh.v1/1"},
                             id=stream_id)  # fmt: skip
        await bus.ensure_group(topic, "g")
        read = await redis.xreadgroup("g", "c", {topic: ">"}, count=2)
        await redis.xack(topic, "g", *[pos for _n, entries in read for pos, _f in entries])
        assert await bus.trim(topic) == 1  # the last delivered one stays: the group's bookmark
        left = [pos.decode() for pos, _f in await redis.xrange(topic)]
        assert left == ids[1:]
    finally:
        await bus.close()


async def test_a_short_lived_redis_publisher_trims_too(redis_server: RedisServer) -> None:
    """`pointmesh ingest produce` of a small file, a restarted service: each publisher trims on
    its first batch, not only after a thousand events of its own."""
    redis = Redis.from_url(redis_server.url)
    topic = new_topic()
    try:
        for round_ in range(5):
            short = RedisStreamBus(redis, maxlen=100)
            await short.publish(topic, [event("m1", round_ * 900 + n) for n in range(900)])
            await short.publish(topic, [event("m1", 10_000 + round_)])
        assert await redis.xlen(topic) <= 1000
    finally:
        await redis.aclose()


async def test_a_consumer_restarted_under_its_name_gets_what_it_had_not_committed_first(bus: EventBus) -> None:
    """e1 read and not committed when the consumer died, e2 published meanwhile: the restarted
    consumer (same name, as `consumer_name` gives an instance) sees e1 before e2."""
    topic = new_topic()
    await bus.ensure_topics([topic])
    name = consumer_name("test", Path("/var/lib/pointmesh"), "0.0.0.0:50051")
    first = bus.group(topic, "g", name)
    await first.poll(max_messages=1, block_ms=10)  # joins the group before anything is published
    await bus.publish(topic, [event("m1", 1)])
    read: list[BusMessage] = []
    async with asyncio.timeout(30):
        while not read:
            read = await first.poll(max_messages=10, block_ms=200)
    await first.close()  # dies without committing
    await bus.publish(topic, [event("m1", 2)])
    again = await drain(bus, topic, "g", name, 2)
    assert [m.event_id for m in again][:2] == ["m1-1", "m1-2"]


async def test_a_poll_moves_past_what_the_last_one_returned_and_a_restart_reads_the_uncommitted_again(
    bus: EventBus,
) -> None:  # fmt: skip
    """As a Kafka consumer does: the handler of a batch that failed is dropped with its consumer
    (run_group), so a live consumer never needs the same batch twice."""
    topic = new_topic()
    await bus.ensure_topics([topic])
    first = bus.group(topic, "g", "c1")
    await first.poll(max_messages=1, block_ms=10)  # joins the group before anything is published
    await bus.publish(topic, [event("m1", i) for i in range(10)])
    seen: list[list[str]] = []
    async with asyncio.timeout(30):
        while sum(map(len, seen)) < 10:
            batch = await first.poll(max_messages=4, block_ms=200)
            if batch:
                seen.append([m.event_id for m in batch])
    ids = [i for batch in seen for i in batch]
    assert sorted(ids) == sorted(f"m1-{i}" for i in range(10)) and len(seen) >= 3  # each once, none again
    await first.close()  # never committed
    again = await drain(bus, topic, "g", "c1", 10)
    assert sorted(m.event_id for m in again) == sorted(ids)


async def test_a_consumer_on_a_busy_stream_still_takes_over_what_a_dead_one_left(redis_server: RedisServer) -> None:
    """Looking for a dead consumer's messages is not done on every poll of a busy stream, but
    it is done: at least once every half of the claim idle time."""
    bus = RedisStreamBus(Redis.from_url(redis_server.url), claim_idle_ms=CLAIM_IDLE_MS, owns_client=True)
    topic = new_topic()
    try:
        await bus.ensure_topics([topic])
        await bus.publish(topic, [event("m_dead", i) for i in range(5)])
        doomed = bus.group(topic, "g", "doomed")
        assert len(await doomed.poll(max_messages=5, block_ms=200)) == 5  # read, never committed
        survivor = bus.group(topic, "g", "survivor")
        got: set[str] = set()
        async with asyncio.timeout(30):
            for n in itertools.count():
                await bus.publish(topic, [event("m_live", n)])  # never caught up: something new each poll
                batch = await survivor.poll(max_messages=50, block_ms=200)
                got |= {m.event_id for m in batch}
                await survivor.commit(batch)
                if {f"m_dead-{i}" for i in range(5)} <= got:
                    break
                await asyncio.sleep(0.02)
    finally:
        await bus.close()


async def test_a_lingering_group_reads_a_busy_stream_in_fuller_batches(redis_server: RedisServer) -> None:
    bus = RedisStreamBus(Redis.from_url(redis_server.url), claim_idle_ms=CLAIM_IDLE_MS, owns_client=True)
    topic = new_topic()
    batches: list[int] = []

    async def handle(messages: list[BusMessage]) -> None:
        if messages:
            batches.append(len(messages))

    stop = asyncio.Event()
    try:
        await bus.ensure_topics([topic])
        await bus.publish(topic, [event("m", i) for i in range(10)])
        running = asyncio.create_task(
            run_group(bus, topic, "g", "c1", handle, stop=stop, block_ms=100, linger_s=1.0)
        )  # fmt: skip
        await until(lambda: batches == [10], 20)
        for burst in range(3):  # while it lingers after a short batch
            await bus.publish(topic, [event("m", 10 + 10 * burst + i) for i in range(10)])
        await until(lambda: sum(batches) == 40, 20)
        stop.set()
        await running
    finally:
        await bus.close()
    assert batches == [10, 30]


def test_an_instance_consumes_under_the_same_name_after_a_restart_and_others_under_their_own() -> None:
    here, there, port = Path("/var/lib/pointmesh"), Path("/srv/ledger-b"), "0.0.0.0:50051"
    assert consumer_name("ledger", here, port) == consumer_name("ledger", here, port)
    names = {consumer_name("ledger", here, port), consumer_name("ledger", there, port),
             consumer_name("rules", here, port), consumer_name("ledger", here, "0.0.0.0:50061")}  # fmt: skip
    assert len(names) == 4  # another directory, service or address on the same host: another consumer


async def test_a_kafka_record_with_a_binary_or_null_header_reaches_the_handler(kafka_bootstrap: str) -> None:
    """Kafka allows such headers (tracing agents, Connect): reading them must not fail the poll,
    which would stop the partition at that record for ever."""
    from aiokafka import AIOKafkaProducer

    topic = new_topic()
    bus = KafkaBus(kafka_bootstrap, partitions=1)
    try:
        await bus.ensure_topics([topic])
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            headers = [("event_id", b"m_b-1"), ("type", b"ops_alert"), ("schema", b"pointmesh.v1/1"),
                       ("traceparent", b"\xff\xfe"), ("baggage", None)]  # fmt: skip
            await producer.send_and_wait(topic, b"payload", key=b"m_b", headers=headers)  # type: ignore[arg-type]
        finally:
            await producer.stop()
        await bus.publish(topic, [event("m_b", 2)])

        got = await drain(bus, topic, "alerts", "c1", 2)
    finally:
        await bus.close()

    assert [m.event_id for m in got] == ["m_b-1", "m_b-2"]
    assert dict(got[0].headers) == {"traceparent": "\ufffd\ufffd", "baggage": ""}


async def test_a_redis_rewind_past_the_newest_event_keeps_one_published_meanwhile(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event published between the rewind's look at the stream and its move of the group
    (another ledger writing on) is delivered, not skipped."""
    topic = new_topic()
    bus = RedisStreamBus(Redis.from_url(redis_server.url), owns_client=True)
    try:
        await bus.publish(topic, [event("m_w", 0)])
        assert len(await drain(bus, topic, "gamification", "g1", 1)) == 1
        real_xinfo = bus.redis.xinfo_stream

        async def then_someone_publishes(name: str) -> Any:
            info = await real_xinfo(name)
            await bus.publish(topic, [event("m_w", 1)])
            return info

        monkeypatch.setattr(bus.redis, "xinfo_stream", then_someone_publishes)
        await asyncio.sleep(0.01)
        await bus.rewind(topic, "gamification", datetime.now(UTC))  # the meanwhile event is stamped after it
        got = await drain(bus, topic, "gamification", "g1", 1)
    finally:
        await bus.close()

    assert [m.event_id for m in got] == ["m_w-1"]


async def test_a_topic_the_kafka_cluster_refuses_to_create_is_an_error(kafka_bootstrap: str) -> None:
    """A replication factor the cluster cannot give (3, the production value, on one broker)
    must stop start-up and `pointmesh events topics create` with the broker's reason; it passed
    as "topics ready" and left every publish failing. Topics that already exist are fine."""
    refused = KafkaBus(kafka_bootstrap, partitions=3, replication=3)
    fine = KafkaBus(kafka_bootstrap, partitions=3)
    topic, existing = new_topic(), new_topic()
    try:
        await fine.ensure_topics([existing])
        with pytest.raises(RuntimeError, match=rf"{topic}: InvalidReplicationFactorError"):
            await refused.ensure_topics([existing, topic])
        await fine.ensure_topics([existing])  # already there: nothing to create, no error
    finally:
        await refused.close()
        await fine.close()
