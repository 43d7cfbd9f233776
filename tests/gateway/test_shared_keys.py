"""API keys in Redis (POINTMESH_GATEWAY_KEY_STORE=redis), as on Kubernetes: a key created
through one gateway replica is accepted by every other, and a revocation through one reaches
them all. Each replica here is its own KeyStore on the one real redis-server."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from gateway.app import key_store
from gateway.keys import KeyRequestError
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer


def test_a_key_created_in_one_replica_works_in_every_replica_until_revoked(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    pods = [
        key_store(
            load_settings({}, data_dir=tmp_path / f"pod{i}", redis_url=redis_server.url, gateway_key_store="redis")
        )
        for i in range(2)
    ]
    try:
        plaintext, created = pods[0].create("pos", ["purchases:write"], ["HEL-01"], "till 7")

        found = pods[1].verify(plaintext)
        assert found is not None and (found.key_id, found.channel, found.stores) == (created.key_id, "pos", ("HEL-01",))
        assert created.key_id in [k.key_id for k in pods[1].list()]
        assert pods[1].verify(plaintext[:-1] + ("x" if plaintext[-1] != "x" else "y")) is None

        pods[1].revoke(created.key_id)
        with pytest.raises(KeyRequestError):
            pods[0].revoke(created.key_id)  # revoked once, whichever replica is asked
        with mock.patch("gateway.keys.time.monotonic", return_value=10**9):  # past the short cache
            assert pods[0].verify(plaintext) is None
    finally:
        for pod in pods:
            pod.close()


def test_keys_stay_on_the_machine_by_default(tmp_path: Path, redis_server: RedisServer) -> None:
    one = key_store(load_settings({}, data_dir=tmp_path / "a", redis_url=redis_server.url))
    other = key_store(load_settings({}, data_dir=tmp_path / "b", redis_url=redis_server.url))
    try:
        plaintext, _ = one.create("web", ["members:read"], [], "shop")
        assert one.verify(plaintext) is not None and other.verify(plaintext) is None
    finally:
        one.close()
        other.close()
