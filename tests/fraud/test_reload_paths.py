"""Artifacts the file system will not let fraud_svc read are refused like any other bad artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest

from fraud_svc.app import build
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc


async def test_a_reload_from_a_path_too_long_for_the_file_system_is_refused_on_path(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    before = await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path="/tmp/" + "a" * 300))
    assert caught.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT), (
        caught.value.code(),
        (caught.value.details() or "")[:120],
    )
    details = caught.value.details() or ""
    assert details.startswith("path:"), details[:120]
    after = await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud"))
    assert after.previous_version == before.version


async def test_a_newest_artifact_whose_model_file_cannot_be_looked_at_does_not_keep_fraud_svc_from_starting(
    tmp_path: Path, fraud_models: Path, redis_server: RedisServer
) -> None:
    models = tmp_path / "models"
    shutil.copytree(fraud_models, models)
    good = max(p.name for p in models.iterdir() if p.name.startswith("fraud-"))
    newest = models / f"{good}-zz-newer"  # sorts after the good one
    shutil.copytree(models / good, newest)
    meta = json.loads((newest / "metadata.json").read_text())
    meta["model_file"] = "m" * 300
    (newest / "metadata.json").write_text(json.dumps(meta))
    settings = load_settings({}, data_dir=tmp_path, redis_url=redis_server.url, models_dir=str(models),
                             fraud_addr="127.0.0.1:0", grace_seconds=1.0)  # fmt: skip
    app = await build(settings)
    await app.start()
    try:
        assert app.service.serving.model is not None and app.service.serving.model.path.name == good
    finally:
        await app.stop(grace=0.5)
