"""Artifacts the file system will not let fraud_svc read, or whose model lies outside them, are refused
like any other bad artifact (a newest one fraud_svc cannot read at start-up: test_service_grpc)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc
from tests.fraud.test_service_grpc import edited_copy


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


def _pointing_out(fraud_models: Path, tmp_path: Path, model_file: str) -> Path:
    """A copy of the serving artifact without its model, whose metadata names a copy of that
    model (checksum and all) outside the artifact."""
    good = max(p for p in fraud_models.iterdir() if p.name.startswith("fraud-"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(good / "model.txt", outside / "model.txt")
    named = str(outside / "model.txt") if model_file == "absolute" else model_file
    artifact = edited_copy(good, tmp_path / "fraud-pointing-out", model_file=named)
    (artifact / "model.txt").unlink()
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
