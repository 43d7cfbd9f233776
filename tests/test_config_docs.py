"""docs/configuration.md lists every setting, and bad values are refused by name."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from pointmesh.config import ConfigError, Settings, load_settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [f.name for f in fields(Settings) if f"`POINTMESH_{f.name.upper()}`" not in text]
    assert missing == []


def test_environment_overrides_defaults_with_types() -> None:
    s = load_settings(
        {"POINTMESH_LEDGER_SHARDS": "8", "POINTMESH_UNITS": "points, miles", "POINTMESH_GRACE_SECONDS": "2.5"}
    )
    assert (s.ledger_shards, s.units, s.grace_seconds) == (8, ("points", "miles"), 2.5)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"POINTMESH_LEDGER_SHARDS": "four"}, "POINTMESH_LEDGER_SHARDS"),
        ({"POINTMESH_LEDGER_SHARDS": "0"}, "POINTMESH_LEDGER_SHARDS"),
        ({"POINTMESH_SQLITE_SYNCHRONOUS": "OFF"}, "POINTMESH_SQLITE_SYNCHRONOUS"),
        ({"POINTMESH_IDEMPOTENCY_RETENTION_DAYS": "0"}, "POINTMESH_IDEMPOTENCY_RETENTION_DAYS"),
        ({"POINTMESH_IDEMPOTENCY_RETENTION_DAYS": "1001"}, "POINTMESH_IDEMPOTENCY_RETENTION_DAYS"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(env)
