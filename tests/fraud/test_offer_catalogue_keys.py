"""An operator file whose mapping carries unknown keys of mixed YAML types (`on:` is a bool key
in YAML 1.1, next to a misspelt string key) is refused as a bad file naming the file and where,
not a TypeError from sorting the unknown keys that kills the start with a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraud_svc.app import build
from fraud_svc.domain import BadRequest
from fraud_svc.offers import catalogue_of
from pointmesh.config import ConfigError, load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.strict_files import load_strict

MIXED_CATALOGUE = "- {offer_id: a, title: A, bonus_points: 5, uplift_percent: 10, on: red, colour: red}\n"


def test_unknown_offer_keys_of_mixed_types_are_refused_naming_the_offer() -> None:
    with pytest.raises(BadRequest) as refused:
        catalogue_of(load_strict(MIXED_CATALOGUE))
    assert refused.value.field == "[0]"


async def test_a_catalogue_with_mixed_unknown_keys_stops_the_start_with_a_config_error(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(MIXED_CATALOGUE)
    settings = load_settings({}, redis_url=redis_server.url, models_dir=str(tmp_path / "models"),
                             fraud_offer_catalogue_file=str(path))  # fmt: skip
    with pytest.raises(ConfigError) as refused:  # today: TypeError escapes build()
        await build(settings)
    assert str(path) in str(refused.value) and "[0]" in str(refused.value)


async def test_a_decision_file_with_mixed_unknown_keys_stops_the_start_naming_the_keys(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Before, the TypeError from sorting was caught as a bad value: the message said `'<' not
    supported` and named neither key the operator has to remove."""
    path = tmp_path / "decisions.yaml"
    path.write_text("on: true\nblocked_device: [x]\n")
    settings = load_settings({}, redis_url=redis_server.url, models_dir=str(tmp_path / "models"),
                             fraud_decision_file=str(path))  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        await build(settings)
    message = str(refused.value)
    assert str(path) in message and "(top)" in message, message
    assert "unknown keys" in message and "True" in message and "'blocked_device'" in message, message
