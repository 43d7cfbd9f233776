"""Settings refuse values that parse but would harm: docs/configuration.md promises a bad value
stops the process naming its variable, not a token born expired, a hold already past its timeout,
an unbounded websocket queue or a traceback far from the cause. The values the tests, `make up`
and the k8s manifests use keep loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pointmesh.config import ConfigError, load_settings
from tests.conftest import pointmesh_cli
from tests.k8s.render import render

K8S = Path(__file__).resolve().parents[2] / "k8s"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEMBER_TOKEN_TTL_SECONDS", "-3600"),
        ("MEMBER_TOKEN_TTL_SECONDS", "0"),
        ("HOLD_TIMEOUT_SECONDS", "-60"),
        ("HOLD_TIMEOUT_SECONDS", "604801"),  # above HOLD_MAX_TIMEOUT_SECONDS
        ("HOLD_MAX_TIMEOUT_SECONDS", "0"),
        ("FRAUD_DEADLINE_SECONDS", "nan"),
        ("FRAUD_DEADLINE_SECONDS", "-1"),
        ("BATCH_DEADLINE_SECONDS", "inf"),
        ("RULES_DEADLINE_SECONDS", "nan"),
        ("GATEWAY_DEADLINE_SECONDS", "0"),
        ("RULES_RELOAD_SECONDS", "-2"),
        ("MAINTENANCE_INTERVAL_SECONDS", "nan"),
        ("OUTBOX_POLL_SECONDS", "0"),
        ("CASSANDRA_REQUEST_TIMEOUT_SECONDS", "inf"),
        ("CACHE_TTL_SECONDS", "0"),
        ("REDIS_TIMEOUT_SECONDS", "-0.5"),
        ("RECONCILE_INTERVAL_SECONDS", "nan"),
        ("RECONCILE_INTERVAL_SECONDS", "-1"),
        ("GRACE_SECONDS", "inf"),
        ("LIVE_QUEUE_MAX", "0"),
        ("LIVE_QUEUE_MAX", "-5"),
        ("EVENT_STREAM_MAXLEN", "0"),
        ("EVENT_PARTITIONS", "0"),
        ("LEDGER_METRICS_PORT", "-1"),
        ("RULES_METRICS_PORT", "65536"),
        ("FRAUD_METRICS_PORT", "70000"),
        ("REDIS_PORT", "0"),
        ("REDIS_PORT", "65536"),
        ("GATEWAY_ADDR", "localhost"),
        ("LEDGER_ADDR", "127.0.0.1:99999"),
        ("RULES_ADDR", ":50052"),
        ("FRAUD_ADDR", "127.0.0.1:port"),
        ("RULES_LEADER_ADDR", "leader"),
        ("KAFKA_BOOTSTRAP", "broker"),
        ("CASSANDRA_CONTACT_POINTS", "nonsense"),
        ("CASSANDRA_CONTACT_POINTS", "a:9042,b:9043"),
        ("EXPIRY_DAYS", "-1"),
        ("LIVE_HISTORY_DAYS", "-30"),
        ("DEFAULT_MODEL_ROWS", "0"),
        ("LOG_LEVEL", "VERBOSE"),
        ("LOG_FORMAT", "xml"),
        ("EVENT_LOOP", "trio"),
        ("UNITS", "points,points2"),  # one merge transaction id for both units' moves
        ("UNITS", "points,Points"),
        ("UNITS", "stars_2025,stars_2026"),
        ("UNITS", "points,points"),
        ("UNITS", "points,tier:credits"),  # would read as another account
        ("UNITS", "points,2025"),
    ],
)
def test_a_harmful_value_is_refused_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"POINTMESH_{name}"):
        load_settings({f"POINTMESH_{name}": value})


@pytest.mark.parametrize(
    "env",
    [
        {
            "POINTMESH_LEDGER_METRICS_PORT": "0",
            "POINTMESH_RULES_METRICS_PORT": "0",
            "POINTMESH_FRAUD_METRICS_PORT": "0",
        },
        {
            "POINTMESH_LEDGER_ADDR": "127.0.0.1:0",
            "POINTMESH_RULES_ADDR": "127.0.0.1:0",
            "POINTMESH_FRAUD_ADDR": "[::1]:0",
        },
        {"POINTMESH_RECONCILE_INTERVAL_SECONDS": "0", "POINTMESH_GRACE_SECONDS": "0", "POINTMESH_EXPIRY_DAYS": "0"},
        {"POINTMESH_LOG_LEVEL": "warning", "POINTMESH_LOG_FORMAT": "text", "POINTMESH_DEFAULT_MODEL_ROWS": "5000"},
        {"POINTMESH_HOLD_TIMEOUT_SECONDS": "604800", "POINTMESH_FRAUD_DEADLINE_SECONDS": "0.2"},
        {"POINTMESH_KAFKA_BOOTSTRAP": "k1:9092,k2:9092", "POINTMESH_CASSANDRA_CONTACT_POINTS": "c1:9042, c2:9042"},
    ],
)
def test_values_the_tests_and_make_up_use_still_load(env: dict[str, str]) -> None:
    load_settings(env)


def _pointmesh_env(doc: dict[str, Any]) -> dict[str, str]:
    if doc["kind"] == "ConfigMap":
        return {k: str(v) for k, v in (doc.get("data") or {}).items() if k.startswith("POINTMESH_")}
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get(
        "spec", {}
    )
    return {
        e["name"]: str(e["value"])
        for c in pod.get("containers", []) + pod.get("initContainers", [])
        for e in c.get("env", [])
        if e["name"].startswith("POINTMESH_") and "value" in e
    }


@pytest.mark.parametrize("target", [K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "prod"])
def test_every_k8s_setting_loads(target: Path) -> None:
    docs = render(target)
    config: dict[str, str] = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            config.update(_pointmesh_env(doc))
    load_settings(config)
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "Job", "CronJob"}:
            load_settings({**config, **_pointmesh_env(doc)})


def test_a_command_given_a_harmful_value_says_so_without_a_traceback(tmp_path: Path) -> None:
    """The hunter's repro: an already-expired member token was printed."""
    done = pointmesh_cli("keys", "member-token", "m1",
                         env={"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_MEMBER_TOKEN_TTL_SECONDS": "-3600"})  # fmt: skip
    assert done.returncode != 0
    assert "POINTMESH_MEMBER_TOKEN_TTL_SECONDS" in done.stderr and "Traceback" not in done.stderr
    assert "member token for" not in done.stdout
