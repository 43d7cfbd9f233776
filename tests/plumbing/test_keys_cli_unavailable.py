"""`pointmesh keys` with an unreachable Redis key store says so and exits UNAVAILABLE."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointmesh.cli import UNAVAILABLE
from pointmesh.redis_server import free_port
from tests.conftest import pointmesh_cli


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "list"],
        ["keys", "revoke", "0123456789ab"],
        ["keys", "create", "--channel", "pos", "--scopes", "members:read"],
    ],
)
def test_the_keys_cli_says_the_redis_key_store_is_unavailable_without_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    env = {"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_GATEWAY_KEY_STORE": "redis",
           "POINTMESH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "POINTMESH_REDIS_TIMEOUT_SECONDS": "1"}  # fmt: skip
    done = pointmesh_cli(*command, env=env)
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == UNAVAILABLE, (done.returncode, done.stderr[-300:])
    assert "unavailable" in done.stderr
