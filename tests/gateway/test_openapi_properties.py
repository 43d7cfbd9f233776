"""Property-based API test: schemathesis generates requests from the served OpenAPI document
against `pointmesh up` (every service real, in its own process) and finds no 5xx and no
response that violates the schema."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

from pointmesh.redis_server import free_port
from tests.conftest import REPO, wait_for_port


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    data = tmp_path_factory.mktemp("up")
    gateway = free_port()
    env = {
        **os.environ, "POINTMESH_DATA_DIR": str(data), "POINTMESH_REDIS_PORT": str(free_port()),
        "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_LEDGER_METRICS_PORT": "0",
        "POINTMESH_RULES_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_RULES_METRICS_PORT": "0",
        "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{gateway}", "POINTMESH_LOG_LEVEL": "WARNING",
        "POINTMESH_FRAUD_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_FRAUD_METRICS_PORT": "0",
        "POINTMESH_DEFAULT_MODEL_ROWS": "5000",
    }  # fmt: skip
    env.pop("POINTMESH_REDIS_URL", None)
    log = (data / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", "up"], env=env, cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for_port(gateway, timeout=60)
        key_file = Path(data) / "gateway" / "demo-key"
        for _ in range(100):
            if key_file.exists():
                break
            wait_for_port(gateway, timeout=1)
        yield f"http://127.0.0.1:{gateway}", key_file.read_text().strip()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
        log.close()


def test_no_5xx_and_every_response_matches_the_schema(platform: tuple[str, str]) -> None:
    url, key = platform
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case: schemathesis.Case) -> None:
            case.headers = {
                **(case.headers or {}),
                "Authorization": f"Bearer {key}",
                "Idempotency-Key": uuid.uuid4().hex,
            }
            response = case.call(base_url=url)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
                return
            try:
                case.validate_response(response, checks=[response_schema_conformance])
            except Exception as exc:  # schemathesis raises a failure group describing the mismatch
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code}: {str(exc)[:500]}")

        exercise()
    assert failures == []
