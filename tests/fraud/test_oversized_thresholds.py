"""A threshold or limit written as a whole number too large for a float (an operator's typo of
digits, `deny: 1000...0`) is a bad value like any other: ReloadModel answers INVALID_ARGUMENT
on `thresholds` and keeps serving, start-up skips that artifact for the one before, and a
decision file holding one stops the start with a ConfigError naming the file and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest

from fraud_svc.app import build, decision_overrides
from fraud_svc.model import latest_artifact
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.velocity import MemoryVelocity
from pointmesh.clock import ManualClock
from pointmesh.config import ConfigError, load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.rpc import client_channel
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc
from tests.fraud.conftest import NOW

HUGE = 10**400  # JSON and YAML read it as an int; float() of it overflows


def _with_huge_threshold(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta["version"] = target.name
    meta["thresholds"]["purchase"] = {"review": 0.5, "deny": HUGE}
    (target / "metadata.json").write_text(json.dumps(meta))
    return target


async def test_reload_of_an_artifact_with_an_oversized_threshold_is_invalid_argument(
    tmp_path: Path, fraud_models: Path, redis_server: RedisServer
) -> None:
    models = Path(shutil.copytree(fraud_models, tmp_path / "models"))
    good = latest_artifact(models, "fraud")
    assert good is not None
    bad = _with_huge_threshold(good, tmp_path / "fraud-huge")
    settings = load_settings({}, data_dir=tmp_path, redis_url=redis_server.url, models_dir=str(models),
                             fraud_addr="127.0.0.1:0", grace_seconds=0.5)  # fmt: skip
    app = await build(settings, clock=ManualClock(NOW))
    await app.start()
    channel = client_channel(f"127.0.0.1:{app.port}", default_timeout_seconds=10.0)
    try:
        stub = fraud_pb2_grpc.FraudServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path=str(bad)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert app.service.fraud.model is not None and app.service.fraud.model.path.name == good.name
    finally:
        await channel.close()
        await app.stop(grace=0.5)


def test_start_up_skips_a_newest_artifact_with_an_oversized_threshold(fraud_models: Path, tmp_path: Path) -> None:
    models = Path(shutil.copytree(fraud_models, tmp_path / "models"))
    good = latest_artifact(models, "fraud")
    assert good is not None
    _with_huge_threshold(good, models / "fraud-29991231T000000Z-deadbeef")  # sorts after the good one
    service = FraudService(MemoryVelocity(), ModelSlot("fraud", models), ModelSlot("churn", models))
    service.load_at_start()  # OverflowError today: fraud_svc does not start at all
    assert service.fraud.model is not None and service.fraud.model.path.name == good.name


def test_a_decision_file_with_an_oversized_limit_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "decisions.yaml"
    path.write_text(f"thresholds:\n  purchase:\n    review: 0.5\n    deny: {HUGE}\n")
    settings = load_settings({}, data_dir=tmp_path, fraud_decision_file=str(path))
    with pytest.raises(ConfigError, match="thresholds"):
        decision_overrides(settings)
