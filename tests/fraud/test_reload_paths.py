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


def _pointing_out(fraud_models: Path, tmp_path: Path, model_file: str) -> Path:
    """A copy of the serving artifact without its model, whose metadata names a copy of that
    model (checksum and all) outside the artifact."""
    good = max(p for p in fraud_models.iterdir() if p.name.startswith("fraud-"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(good / "model.txt", outside / "model.txt")
    artifact = tmp_path / "fraud-pointing-out"
    shutil.copytree(good, artifact)
    (artifact / "model.txt").unlink()
    meta = json.loads((artifact / "metadata.json").read_text())
    meta["model_file"] = str(outside / "model.txt") if model_file == "absolute" else model_file
    (artifact / "metadata.json").write_text(json.dumps(meta))
    return artifact


@pytest.mark.parametrize("model_file", ["../elsewhere/model.txt", "absolute", ".."])
async def test_an_artifact_whose_model_file_points_out_of_it_is_refused(
    stub: fraud_pb2_grpc.FraudServiceStub, tmp_path: Path, fraud_models: Path, model_file: str
) -> None:
    """The checksum is the artifact's own: metadata naming a model elsewhere loaded a file that
    was never part of the artifact."""
    artifact = _pointing_out(fraud_models, tmp_path, model_file)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReloadModel(fraud_pb2.ReloadModelRequest(model="fraud", path=str(artifact)))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert "is not a file name in the artifact" in (caught.value.details() or "")
