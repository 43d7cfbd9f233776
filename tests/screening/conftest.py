"""The screened mesh (rules_svc, fraud_svc and a screening ledger) every test here runs on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pointmesh.redis_server import RedisServer
from tests.screening.test_fraud_on_the_path import Screened, screened_mesh


@pytest.fixture
async def screened(tmp_path: Path, redis_server: RedisServer, fraud_models: Path) -> AsyncIterator[Screened]:
    async with screened_mesh(tmp_path, redis_server, fraud_models) as env:
        yield env


@pytest.fixture
def stolen_device(tmp_path: Path) -> Path:
    """A decision file blocking device `dev-stolen`, for a fraud_svc (re)started with it."""
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"blocked_devices": ["dev-stolen"]}))
    return decision
