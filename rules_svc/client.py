"""Small client helpers for operators: publish a program file to a running rules_svc."""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime
from pathlib import Path

import grpc

from pointmesh.clients import closing, rules_stub
from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2


async def publish_file(target: str, path: str, effective_from: datetime | None, key: str, by: str) -> int:
    text = Path(path).read_text()  # noqa: ASYNC240 - a one-shot CLI, nothing else runs on this loop
    request = rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(namespace="cli", key=key or hashlib.sha256(text.encode()).hexdigest()),
        document=text, format="json" if path.endswith(".json") else "yaml",
        effective_from=to_timestamp(effective_from), published_by=by,
    )  # fmt: skip
    try:
        async with closing(rules_stub(target)) as stub:
            response = await stub.PublishProgram(request)
    except grpc.aio.AioRpcError as error:
        print(f"{path}: {error.code().name}: {error.details()}", file=sys.stderr)
        for detail in status_details(error):
            for violation in getattr(detail, "field_violations", []):
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    v = response.version
    print(f"published {v.program} v{v.version}, effective from {v.effective_from.ToJsonString()}")
    return 0
