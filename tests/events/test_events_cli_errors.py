"""`pointmesh events replay|redrive`: bad input, an unreachable bus and a group still consuming
get a precise message, never a traceback, and nothing is written."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pointmesh.events import OutgoingEvent
from pointmesh.kafka_bus import KafkaBus
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import pointmesh_cli


@pytest.mark.parametrize(
    "command",
    [
        ["events", "replay", "--group", "rules-gamification", "--from", "2026-11-20T00:00Z"],
        ["events", "redrive", "--group", "rules-gamification"],
    ],
)
def test_events_cli_to_a_bus_it_cannot_reach_says_so_without_a_traceback(tmp_path: Path, command: list[str]) -> None:
    """As `events topics create` and `ingest produce` do: the operator gets the reason, not a
    redis-py traceback."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = pointmesh_cli(*command, env={"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_EVENT_BUS": "redis",
                                        "POINTMESH_REDIS_URL": url, "POINTMESH_REDIS_TIMEOUT_SECONDS": "1"})  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode != 0
    assert f"cannot reach the event bus at {url}" in done.stderr, done.stderr[-300:]


async def test_replay_of_a_topic_that_is_none_of_pointmeshs_is_refused_not_reported_done(tmp_path: Path) -> None:
    """A mistyped --topic: the command said the group "will read again" and exited 0, and left a
    stray stream and group behind; nothing is replayed. `events redrive` refuses such a topic."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    try:
        env = {"POINTMESH_EVENT_BUS": "redis", "POINTMESH_REDIS_URL": server.url, "POINTMESH_DATA_DIR": str(tmp_path)}
        done = await asyncio.to_thread(pointmesh_cli, "events", "replay", "--group", "rules-gamification",
                                       "--topic", "pointmesh.ledger.evnts", "--from", "2026-11-20T00:00Z", env=env)  # fmt: skip
        redis = Redis.from_url(server.url)
        stray = await redis.exists("pointmesh.ledger.evnts")
        await redis.aclose()
        assert done.returncode != 0, done.stdout
        assert "will read again" not in done.stdout
        assert "--topic" in done.stderr, done.stderr[-300:]
        assert not stray
    finally:
        server.stop()


async def test_rewinding_a_kafka_group_with_a_running_consumer_says_to_stop_it(kafka_bootstrap: str) -> None:
    """docs/events.md: a rewind on Kafka needs the group to have no running consumers (as Kafka's
    own tool does). The operator who forgot is told so, not sent after max_poll_interval_ms by
    aiokafka's CommitFailedError (`events replay` prints the reason, as for the cases above)."""
    topic, group = f"test.{uuid.uuid4().hex[:10]}", f"g-{uuid.uuid4().hex[:6]}"
    bus = KafkaBus(kafka_bootstrap, partitions=1)
    await bus.ensure_topics([topic])
    await bus.publish(topic, [OutgoingEvent("m1", "e1", "ops_alert", b"x")])
    member = bus.group(topic, group, "c1")
    try:
        async with asyncio.timeout(30):
            while not await member.poll(max_messages=10, block_ms=500):
                pass
        with pytest.raises(RuntimeError, match=f"group {group} has consumers running on {topic}: stop them first"):
            await bus.rewind(topic, group, datetime(1970, 1, 1, tzinfo=UTC))
    finally:
        await member.close()
        await bus.close()


async def test_a_replay_that_rewound_the_group_says_so_and_exits_0(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    try:
        env = {"POINTMESH_EVENT_BUS": "redis", "POINTMESH_REDIS_URL": server.url, "POINTMESH_DATA_DIR": str(tmp_path)}
        done = await asyncio.to_thread(pointmesh_cli, "events", "replay", "--group", "rules-gamification",
                                       "--from", "2026-11-20T00:00Z", env=env)  # fmt: skip
        assert "will read again" in done.stdout, (done.stdout, done.stderr[-300:])
        assert done.returncode == 0, done.stderr[-300:]
    finally:
        server.stop()
