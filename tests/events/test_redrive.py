"""Dead letters go back on their topic once their cause is fixed: only the group's own, each
once, with their key, id and headers (not the dlq_ ones); on Redis Streams and on a real Kafka
broker, and through `pointmesh events redrive`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pointmesh import consumers
from pointmesh.consumers import dead_letter, in_order, run_group
from pointmesh.events import INGEST_PURCHASES, BusMessage, EventBus, RedisStreamBus, dead_letter_topic
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.redrive import header, redrive
from tests.conftest import pointmesh_cli
from tests.events.test_bus_conformance import bus, drain, event, new_topic
from tests.waiting import until

__all__ = ["bus"]
QUIET = 3.0  # long enough for a Kafka group to be given its partitions


async def _dead_lettered(bus: EventBus, topic: str, group: str, names: list[str], reason: str) -> None:
    """Messages as `group` received them (with a header of the producer's), dead-lettered."""
    for name in names:
        sent = event(name, 1)
        received = BusMessage(f"pos-{name}", sent.key, sent.event_id, sent.event_type, sent.payload, sent.schema,
                              headers=(("traceparent", f"00-{name}"),))  # fmt: skip
        await dead_letter(bus, topic, group, received, reason)


async def test_a_groups_dead_letters_go_back_once_and_other_groups_wait_for_their_own(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    await _dead_lettered(bus, topic, "g-ledger", ["m_a", "m_b", "m_c"], "member m_a is BLOCKED")
    await _dead_lettered(bus, topic, "g-game", ["m_x", "m_y"], "no program version in effect")

    first = await redrive(bus, topic, "g-ledger", idle_seconds=QUIET)
    assert (first.sent, first.other_groups, dict(first.reasons)) == (3, 2, {"member m_a is BLOCKED": 3})
    back = await drain(bus, topic, "reader", "c1", 3)
    assert sorted(m.event_id for m in back) == ["m_a-1", "m_b-1", "m_c-1"]
    for message in back:
        assert header(message, "traceparent") == f"00-{message.key}"
        assert header(message, "redriven_from") and not any(k.startswith("dlq_") for k, _ in message.headers)
        assert message.payload == event(message.key, 1).payload and message.event_type == "ops_alert"

    again = await redrive(bus, topic, "g-ledger", idle_seconds=QUIET)
    assert again.sent == 0  # each dead letter once
    await _dead_lettered(bus, topic, "g-ledger", ["m_d"], "failed 5 times: ValueError: bad")
    later = await redrive(bus, topic, "g-ledger", idle_seconds=QUIET)
    assert (later.sent, dict(later.reasons)) == (1, {"failed 5 times: ValueError: bad": 1})
    games = await redrive(bus, topic, "g-game", idle_seconds=QUIET)
    assert (games.sent, games.other_groups) == (2, 4)  # the g-ledger ones, m_d included
    assert sorted(m.event_id for m in await drain(bus, topic, "reader", "c1", 3)) == ["m_d-1", "m_x-1", "m_y-1"]


async def test_a_limit_sends_back_only_that_many_and_the_rest_come_next_time(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    await _dead_lettered(bus, topic, "g", [f"m_{i}" for i in range(7)], "refused")
    assert (await redrive(bus, topic, "g", limit=4, idle_seconds=QUIET)).sent == 4
    assert (await redrive(bus, topic, "g", idle_seconds=QUIET)).sent == 3
    assert sorted(m.event_id for m in await drain(bus, topic, "reader", "c1", 7)) == sorted(
        f"m_{i}-1" for i in range(7)
    )


async def test_the_cli_redrives_the_ingest_topic(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    made = RedisStreamBus(Redis.from_url(server.url), owns_client=True)
    try:
        await made.ensure_topics([INGEST_PURCHASES, dead_letter_topic(INGEST_PURCHASES)])
        await _dead_lettered(made, INGEST_PURCHASES, "ledger-ingest", ["m_1", "m_2"], "member_id: m_1 is BLOCKED")
        env = {"POINTMESH_EVENT_BUS": "redis", "POINTMESH_REDIS_URL": server.url}
        done = await asyncio.to_thread(pointmesh_cli, "events", "redrive", "--group", "ledger-ingest",
                                       "--topic", INGEST_PURCHASES, env=env)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ledger-ingest: 2 dead letters sent back on {INGEST_PURCHASES}" in done.stdout
        assert "2  member_id: m_1 is BLOCKED" in done.stdout
        back = await drain(made, INGEST_PURCHASES, "ledger-ingest", "c1", 2)
        assert sorted(m.event_id for m in back) == ["m_1-1", "m_2-1"]
        refused = await asyncio.to_thread(pointmesh_cli, "events", "redrive", "--group", "g", "--limit", "0", env=env)
        assert refused.returncode == 2 and "--limit: must be at least 1" in refused.stderr
    finally:
        await made.close()
        server.stop()


async def test_a_dead_letter_that_fails_again_goes_back_once_per_run_not_round_in_a_loop(bus: EventBus) -> None:
    """Its cause not fixed yet: the group's consumer dead-letters the copy again at once. The
    run ends having sent it once; the new dead letter waits for the next run."""
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    await _dead_lettered(bus, topic, "g", ["m_a"], "member m_a is BLOCKED")
    handled: list[str] = []
    stop = asyncio.Event()

    async def still_refusing() -> None:
        member = bus.group(topic, "g", "c1")
        try:
            while not stop.is_set():  # (not cancelled: a blocking read on Redis does not take it well)
                for message in (batch := await member.poll(max_messages=10, block_ms=200)):
                    handled.append(message.event_id)
                    await dead_letter(bus, topic, "g", message, "member m_a is BLOCKED")
                await member.commit(batch)
        finally:
            await member.close()

    refuser = asyncio.create_task(still_refusing())
    try:
        async with asyncio.timeout(60):
            first = await redrive(bus, topic, "g", idle_seconds=QUIET)
            assert first.sent == 1
            await until(lambda: handled == ["m_a-1"], 30)
    finally:
        stop.set()
        await refuser
    assert (await redrive(bus, topic, "g", idle_seconds=QUIET)).sent == 1  # the new dead letter, next run
    assert handled == ["m_a-1"]


async def test_another_groups_copies_of_the_same_events_do_not_stop_a_groups_redrive(bus: EventBus) -> None:
    """Every group of a topic dead-letters an event of a schema none knows: the same event ids
    from two groups, more than one poll's worth, are not the run's own repeats."""
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    names = [f"m_{i}" for i in range(120)]
    await _dead_lettered(bus, topic, "g-rules", names, "schema major version 2 is unknown here")
    await _dead_lettered(bus, topic, "g-gateway", names, "schema major version 2 is unknown here")
    await _dead_lettered(bus, topic, "g-rules", ["m_late"], "failed 5 times: ValueError: x")

    done = await redrive(bus, topic, "g-rules", idle_seconds=QUIET)

    assert (done.sent, done.other_groups) == (121, 120)
    assert not done.more_left


async def test_dead_letters_without_an_event_id_all_go_back_in_one_run(bus: EventBus) -> None:
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    for n in range(150):  # a foreign producer's entries, with no readable schema and no event id
        await dead_letter(bus, topic, "g", BusMessage(f"pos-{n}", "m_a", "", "", b"x", ""), "no readable schema header")

    done = await redrive(bus, topic, "g", idle_seconds=QUIET)

    assert done.sent == 150
    assert not done.more_left


async def test_the_cli_says_when_a_limit_left_dead_letters_for_another_run(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    made = RedisStreamBus(Redis.from_url(server.url), owns_client=True)
    try:
        await _dead_lettered(made, INGEST_PURCHASES, "ledger-ingest", ["m_1", "m_2"], "member_id: m_1 is BLOCKED")
        env = {"POINTMESH_EVENT_BUS": "redis", "POINTMESH_REDIS_URL": server.url}
        done = await asyncio.to_thread(pointmesh_cli, "events", "redrive", "--group", "ledger-ingest",
                                       "--topic", INGEST_PURCHASES, "--limit", "1", env=env)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ledger-ingest: 1 dead letters sent back on {INGEST_PURCHASES}; stopped at --limit 1" in done.stdout
        rest = await asyncio.to_thread(pointmesh_cli, "events", "redrive", "--group", "ledger-ingest",
                                       "--topic", INGEST_PURCHASES, env=env)  # fmt: skip
        assert f"ledger-ingest: 1 dead letters sent back on {INGEST_PURCHASES}\n" in rest.stdout
    finally:
        await made.close()
        server.stop()


async def test_a_message_dead_lettered_twice_goes_back_once(bus: EventBus) -> None:
    """Two dead-letter copies of one message (from the same position: its group dead-lettered
    it again when a failed commit made it read the batch again). The first run sent one and
    stopped at the other, taking it for one that failed again; the next run sent it too."""
    topic = new_topic()
    await bus.ensure_topics([topic, dead_letter_topic(topic)])
    await _dead_lettered(bus, topic, "g", ["m_a", "m_b"], "unknown schema")
    await _dead_lettered(bus, topic, "g", ["m_a"], "unknown schema")
    first = await redrive(bus, topic, "g", idle_seconds=QUIET)
    assert (first.sent, first.more_left) == (2, False)
    assert (await redrive(bus, topic, "g", idle_seconds=QUIET)).sent == 0
    assert sorted(m.event_id for m in await drain(bus, topic, "reader", "c1", 2)) == ["m_a-1", "m_b-1"]


async def test_a_batch_read_again_after_its_commit_failed_does_not_dead_letter_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poison message and a good one in a batch; Redis refuses the XACK once (a failover),
    the consumer reopens and reads both again: the poison went to the dead-letter topic twice."""
    monkeypatch.setattr(consumers, "RETRY_PAUSE_SECONDS", 0.05)
    admin = Redis.from_url(redis_server.url)
    redis_bus = RedisStreamBus(Redis.from_url(redis_server.url), owns_client=True)
    topic = new_topic()
    try:
        await redis_bus.publish(topic, [event("m_a", 1, schema="pointmesh.v1/2"), event("m_b", 2)])
        handled: list[str] = []

        async def handle(message: BusMessage) -> None:
            handled.append(message.event_id)
            # The first batch's commit is refused; the batch read again commits.
            await admin.execute_command("ACL", "SETUSER", "default", "-xack" if len(handled) == 1 else "+xack")

        stop = asyncio.Event()
        runner = asyncio.create_task(run_group(redis_bus, topic, "g", "c1", in_order(redis_bus, topic, "g", handle),
                                               stop=stop, block_ms=200))  # fmt: skip
        await until(lambda: len(handled) >= 2, 30)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(runner, 10)
        copies = [f for _id, f in await admin.xrange(dead_letter_topic(topic)) if f[b"event_id"] == b"m_a-1"]
        assert len(copies) == 1
    finally:
        await admin.execute_command("ACL", "SETUSER", "default", "+xack")
        await admin.aclose()
        await redis_bus.close()
