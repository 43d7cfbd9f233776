"""The private redis-server: ready when started, unreachable while paused, durable across restarts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError

from pointmesh.redis_server import RedisServer, free_port


def impatient_client(url: str) -> redis.Redis:
    # One attempt only: redis-py retries timeouts three times with backoff by default.
    return redis.Redis.from_url(url, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))


async def test_pause_makes_clients_time_out_and_resume_makes_them_answer(tmp_path: Path) -> None:
    with RedisServer(free_port(), tmp_path) as server:
        client = impatient_client(server.url)
        try:
            assert await client.ping()
            server.pause()
            with pytest.raises(RedisTimeoutError):
                await client.ping()
            server.resume()
            assert await client.ping()
        finally:
            await client.aclose()


async def test_stop_frees_the_port_and_restart_keeps_appendonly_data(tmp_path: Path) -> None:
    port = free_port()
    server = RedisServer(port, tmp_path)
    server.start()
    client = impatient_client(server.url)
    await client.set("balance:a-1", "40")
    await client.aclose()
    server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    with RedisServer(port, tmp_path) as restarted:
        client = impatient_client(restarted.url)
        try:
            assert await client.get("balance:a-1") == b"40"
        finally:
            await client.aclose()


def test_stop_works_while_paused(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    server.pause()
    server.stop(timeout=5)
    with pytest.raises(RuntimeError):
        _ = server.pid


def test_second_server_on_a_taken_port_fails_with_its_log(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer(port, tmp_path / "first"):
        second = RedisServer(port, tmp_path / "second")
        with pytest.raises(RuntimeError, match=r"exited with code|another redis-server"):
            second.start(timeout=5)


def test_free_port_never_hands_out_the_same_port_twice_in_a_process() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
