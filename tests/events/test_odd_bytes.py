"""Odd bytes on the Redis Streams bus and the ingest topic: an entry written by a raw XADD whose
fields are not UTF-8, a schema header whose major is a digit `int()` cannot read, a purchase
that fails to decode in any way, a purchases file with a line that is not UTF-8. Each reaches
its handler or the dead-letter topic with a reason; none stalls its consumer group or crashes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from redis.asyncio import Redis

from ledger_svc import convert
from ledger_svc.ingest_worker import GROUP, IngestWorker
from pointmesh import consumers
from pointmesh.clock import ManualClock
from pointmesh.consumers import Poison, check_schema, in_order, run_group
from pointmesh.events import INGEST_PURCHASES, BusMessage, OutgoingEvent, RedisStreamBus, dead_letter_topic
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2
from tests.conftest import pointmesh_cli, start_ledger, start_rules, stop_ledger, stop_rules
from tests.events.test_bus_conformance import event, new_topic
from tests.mesh.conftest import PROGRAM, START, Mesh
from tests.mesh.helpers import new_member, points, purchase_request
from tests.waiting import until

# Fields a raw XADD wrote that are not UTF-8: the key, the event id and a header of its own.
ODD_ENTRY = {
    b"key": b"m_\xff", b"event_id": b"\xff\xfe", b"type": b"ops_alert", b"payload": b"\x00\xff",
    b"schema": b"pointmesh.v1/1", b"trace\xff": b"00-\xfe",
}  # fmt: skip


@pytest.fixture
async def redis_bus(redis_server: RedisServer) -> AsyncIterator[RedisStreamBus]:
    bus = RedisStreamBus(Redis.from_url(redis_server.url), owns_client=True)
    yield bus
    await bus.close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)


@pytest.mark.usefixtures("quick_retries")
async def test_an_entry_that_is_not_utf8_reaches_its_handler_and_the_group_moves_on(
    redis_bus: RedisStreamBus,
) -> None:
    """Read with replacement characters, as the Kafka bus reads a header that is not UTF-8: the
    entry before it and the one after are handled, and a handler refusing it dead-letters it."""
    topic = new_topic()
    await redis_bus.publish(topic, [event("m_a", 1)])
    await redis_bus.redis.xadd(topic, ODD_ENTRY)
    await redis_bus.publish(topic, [event("m_a", 2)])
    handled: list[BusMessage] = []

    async def handle(message: BusMessage) -> None:
        handled.append(message)
        if "\ufffd" in message.event_id:
            raise Poison("event id is not UTF-8")

    stop = asyncio.Event()
    group = run_group(redis_bus, topic, "g-odd", "c1", in_order(redis_bus, topic, "g-odd", handle), stop=stop,
                      block_ms=50)  # fmt: skip
    running = asyncio.create_task(group)
    try:
        await until(lambda: len(handled) >= 3, 20)
        await until(lambda: redis_bus.redis.xlen(dead_letter_topic(topic)), 10)
    finally:
        stop.set()
        await running

    assert [m.event_id for m in handled] == ["m_a-1", "\ufffd\ufffd", "m_a-2"]
    odd = handled[1]
    assert (odd.key, odd.event_type, odd.payload, odd.schema_major) == ("m_\ufffd", "ops_alert", b"\x00\xff", 1)
    assert odd.headers == (("trace\ufffd", "00-\ufffd"),)
    (_, dead), *more = await redis_bus.redis.xrange(dead_letter_topic(topic))
    assert not more
    assert dead[b"dlq_reason"] == b"event id is not UTF-8" and dead[b"payload"] == b"\x00\xff"
    assert dead[b"event_id"].decode() == "\ufffd\ufffd"
    assert (await redis_bus.redis.xpending(topic, "g-odd"))["pending"] == 0


async def test_a_subscriber_reads_past_an_entry_that_is_not_utf8(redis_bus: RedisStreamBus) -> None:
    topic = new_topic()
    await redis_bus.publish(topic, [event("m_a", 1)])
    await redis_bus.redis.xadd(topic, ODD_ENTRY)
    await redis_bus.publish(topic, [event("m_a", 2)])
    seen: list[str] = []
    async with asyncio.timeout(10):
        async for message in redis_bus.subscribe(topic, "0", block_ms=50):
            seen.append(message.event_id)
            if len(seen) == 3:
                break
    assert seen == ["m_a-1", "\ufffd\ufffd", "m_a-2"]


@pytest.mark.parametrize(
    ("schema", "major"),
    [
        ("pointmesh.v1/1", 1),
        ("pointmesh.v1/01", 1),
        ("pointmesh.v1/2", 2),
        ("pointmesh.v1/\u00b2", None),  # superscript two: isdigit() says yes, int() refuses it
        ("pointmesh.v1/\u0661", None),  # Arabic-Indic one: int() reads it as 1, but no header says so
        ("pointmesh.v1/" + "9" * 5000, None),  # past int()'s digit limit
        ("pointmesh.v1/" + "0" * 5000 + "1", 1),  # leading zeros count towards that limit too
        ("pointmesh.v1/", None),
        ("", None),
    ],
)
def test_the_schema_major_is_ascii_digits_or_unreadable(schema: str, major: int | None) -> None:
    message = BusMessage("1-0", "m_a", "e", "t", b"", schema)
    assert message.schema_major == major
    if major is None:
        with pytest.raises(Poison, match="no readable schema header"):
            check_schema(message)


@pytest.mark.usefixtures("quick_retries")
async def test_a_schema_major_int_cannot_read_is_dead_lettered_at_once_as_unreadable(
    redis_bus: RedisStreamBus,
) -> None:
    topic = new_topic()
    await redis_bus.publish(topic, [event("m_a", 1), event("m_a", 2, schema="pointmesh.v1/\u00b2"), event("m_a", 3)])
    handled: list[str] = []

    async def handle(message: BusMessage) -> None:
        handled.append(message.event_id)

    stop = asyncio.Event()
    running = asyncio.create_task(run_group(
        redis_bus, topic, "g-schema", "c1", in_order(redis_bus, topic, "g-schema", handle), stop=stop, block_ms=50
    ))  # fmt: skip
    try:
        await until(lambda: redis_bus.redis.xlen(dead_letter_topic(topic)), 20)
        await until(lambda: len(handled) >= 2, 10)
    finally:
        stop.set()
        await running
    assert handled == ["m_a-1", "m_a-3"]
    ((_, dead),) = await redis_bus.redis.xrange(dead_letter_topic(topic))
    assert dead[b"event_id"] == b"m_a-2"
    assert dead[b"dlq_reason"].decode().startswith("no readable schema header")


# The ingest topic against a real ledger ---------------------------------------------------------


@pytest.fixture
async def sqlite_mesh(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Mesh]:
    """rules_svc and ledger_svc (SQLite) as in tests/mesh, on the SQLite store alone."""
    clock = ManualClock(START)
    port = free_port()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(PROGRAM))
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}",
                                program="meshmart", rules_deadline_seconds=2.0, store="sqlite")  # fmt: skip
    running = Mesh(rules, ledger, clock, port, tmp_path)
    yield running
    await stop_ledger(running.ledger)
    await stop_rules(running.rules)


async def _ingest(mesh: Mesh, tmp_path: Path, events: list[OutgoingEvent], done: Any) -> list[tuple[Any, Any]]:
    """The events on an ingest topic of this test alone, consumed by an IngestWorker until
    `done(redis)` holds; returns the dead-letter topic's entries."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    bus = RedisStreamBus(Redis.from_url(server.url), owns_client=True)
    try:
        await bus.publish(INGEST_PURCHASES, events)
        worker = IngestWorker(mesh.ledger.app.service, bus, "c1", batch=20)
        running = asyncio.create_task(worker.run())
        try:
            await until(lambda: done(bus.redis), 20)
            await asyncio.sleep(0.3)  # a batch read again would dead-letter them again now
            assert (await bus.redis.xpending(INGEST_PURCHASES, GROUP))["pending"] == 0
            dead: list[tuple[Any, Any]] = await bus.redis.xrange(dead_letter_topic(INGEST_PURCHASES))
            return dead
        finally:
            worker.stop.set()
            await running
    finally:
        await bus.close()
        server.stop()


def _purchase_event(request: ledger_pb2.RecordPurchaseRequest, **kw: Any) -> OutgoingEvent:
    natural = f"{request.channel}/{request.store_id}/{request.receipt_id}"
    return OutgoingEvent(request.member_id, natural, "record_purchase", request.SerializeToString(), **kw)


@pytest.mark.usefixtures("quick_retries")
async def test_a_purchase_with_an_unreadable_schema_major_is_dead_lettered_and_the_others_post(
    sqlite_mesh: Mesh, tmp_path: Path
) -> None:
    mesh = sqlite_mesh
    members = [await new_member(mesh) for _ in range(3)]
    feed = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=f"R-{i}")
            for i, m in enumerate(members, 1)]  # fmt: skip
    events = [
        _purchase_event(feed[0]),
        _purchase_event(feed[1], schema="pointmesh.v1/\u00b2"),
        _purchase_event(feed[2]),
    ]

    async def settled(redis: Redis) -> bool:
        return bool(await redis.xlen(dead_letter_topic(INGEST_PURCHASES))) and await points(mesh, members[2]) > 0

    dead = await _ingest(mesh, tmp_path, events, settled)

    assert [await points(mesh, m) > 0 for m in members] == [True, False, True]
    assert [fields[b"event_id"] for _, fields in dead] == [b"pos/HEL-01/R-2"]
    assert dead[0][1][b"dlq_reason"].decode().startswith("no readable schema header")


@pytest.mark.usefixtures("quick_retries")
async def test_a_purchase_that_fails_to_decode_in_any_way_is_dead_lettered_not_the_batch_stalled(
    sqlite_mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = sqlite_mesh
    real = convert.purchase_cmd

    def with_a_bug(request: ledger_pb2.RecordPurchaseRequest) -> Any:
        if request.receipt_id == "R-2":  # fault injection: a decoding failure nobody foresaw
            raise RuntimeError("a bug in decoding")
        return real(request)

    monkeypatch.setattr(convert, "purchase_cmd", with_a_bug)
    members = [await new_member(mesh) for _ in range(3)]
    feed = [purchase_request(m, [("misc", 2_000, 1)], at=mesh.clock.now(), receipt=f"R-{i}")
            for i, m in enumerate(members, 1)]  # fmt: skip

    async def settled(redis: Redis) -> bool:
        return bool(await redis.xlen(dead_letter_topic(INGEST_PURCHASES))) and await points(mesh, members[2]) > 0

    dead = await _ingest(mesh, tmp_path, [_purchase_event(r) for r in feed], settled)

    assert [await points(mesh, m) > 0 for m in members] == [True, False, True]
    assert [fields[b"event_id"] for _, fields in dead] == [b"pos/HEL-01/R-2"]
    assert b"RuntimeError: a bug in decoding" in dead[0][1][b"dlq_reason"]


# `pointmesh ingest produce` -------------------------------------------------------------------


async def _produced(tmp_path: Path, feed: Path) -> tuple[Any, list[Any]]:
    """`pointmesh ingest produce FEED` to a Redis of its own: the CLI's outcome, and what reached
    the ingest stream."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    try:
        env = {"POINTMESH_EVENT_BUS": "redis", "POINTMESH_REDIS_URL": server.url, "POINTMESH_DATA_DIR": str(tmp_path)}
        done = await asyncio.to_thread(pointmesh_cli, "ingest", "produce", str(feed), env=env)
        redis = Redis.from_url(server.url)
        sent = await redis.xrange(INGEST_PURCHASES)
        await redis.aclose()
    finally:
        server.stop()
    return done, sent


async def test_ingest_produce_reports_a_line_that_is_not_utf8_by_number_and_sends_the_rest(tmp_path: Path) -> None:
    good = [purchase_request("m_" + "1" * 28, [("misc", 1_000, 1)], at=START, receipt=f"P-{i}") for i in (1, 2)]
    feed = tmp_path / "purchases.jsonl"
    feed.write_bytes(
        json_format.MessageToJson(good[0], indent=None).encode() + b"\n"
        + b'{"member_id": "m_\xff\xfe", "receipt_id": "P-X"}\n'
        + json_format.MessageToJson(good[1], indent=None).encode() + b"\n"
    )  # fmt: skip
    done, sent = await _produced(tmp_path, feed)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"{feed}:2: not UTF-8" in done.stderr
    assert "2 purchases on" in done.stdout and "1 bad lines not sent" in done.stdout
    assert [fields[b"event_id"] for _, fields in sent] == [b"pos/HEL-01/P-1", b"pos/HEL-01/P-2"]


def _good_line(receipt: str) -> bytes:
    request = purchase_request("m_" + "1" * 28, [("misc", 1_000, 1)], at=START, receipt=receipt)
    return json_format.MessageToJson(request, indent=None).encode()


async def test_ingest_produce_reports_a_line_that_is_a_json_array_and_sends_the_rest(tmp_path: Path) -> None:
    """json_format reads `[]` as an empty purchase: it was sent, and dead-lettered by the ledger."""
    feed = tmp_path / "purchases.jsonl"
    feed.write_bytes(b"\n".join([_good_line("P-1"), b"[]", b"5", _good_line("P-2")]) + b"\n")
    done, sent = await _produced(tmp_path, feed)
    assert f"{feed}:2: not a purchase" in done.stderr and f"{feed}:3: not a purchase" in done.stderr, done.stderr
    assert [fields[b"event_id"] for _, fields in sent] == [b"pos/HEL-01/P-1", b"pos/HEL-01/P-2"]


def test_ingest_produce_to_a_bus_it_cannot_reach_says_so_without_a_traceback(tmp_path: Path) -> None:
    feed = tmp_path / "purchases.jsonl"
    feed.write_bytes(_good_line("P-1") + b"\n")
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = pointmesh_cli("ingest", "produce", str(feed), env={"POINTMESH_DATA_DIR": str(tmp_path),
                                                               "POINTMESH_REDIS_URL": url})  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert f"cannot reach the event bus at {url}" in done.stderr and "0 of 1 purchases sent" in done.stderr
