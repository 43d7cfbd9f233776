"""The fraud team's files are read like loyalty programs: a key given twice in one mapping stops
the start, naming the file, the key and its line. Before, fraud_svc read them with
yaml.safe_load, which keeps the last of two equal keys: a decision file with `deny: 0.9` and,
pasted below it, `deny: 0.99` served 0.99 without a word."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraud_svc.app import build
from pointmesh.config import ConfigError, load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.strict_files import AmbiguousNumber, DuplicateKey, load_strict

DECISION_TWICE = """\
blocked_devices: [dev-stolen-7]
thresholds:
  redemption:
    review: 0.3
    deny: 0.9
    deny: 0.99
"""
DECISION_TWICE_JSON = """\
{"thresholds": {"redemption": {"review": 0.3, "deny": 0.9}},
 "unscored_verdict": "allow",
 "unscored_verdict": "deny"}
"""
CATALOGUE_TWICE = """\
- offer_id: winback-1000
  title: "1000 points to come back"
  bonus_points: 100
  uplift_percent: 40
- offer_id: bonus-50
  title: "50 points"
  bonus_points: 50
  uplift_percent: 10
  bonus_points: 5000
"""


@pytest.mark.parametrize(
    ("setting", "text", "key", "line"),
    [
        pytest.param("fraud_decision_file", DECISION_TWICE, "'deny'", 6, id="decision-yaml"),
        pytest.param("fraud_decision_file", DECISION_TWICE_JSON, "'unscored_verdict'", 3, id="decision-json"),
        pytest.param("fraud_offer_catalogue_file", CATALOGUE_TWICE, "'bonus_points'", 9, id="catalogue"),
        pytest.param("fraud_decision_file", "rules:\n- &r {name: a, feature: member_returns_7d, limit: 3}\n"
                     "- {<<: *r, <<: *r, name: b}\n", "'<<'", 3, id="two-merges"),
    ],
)  # fmt: skip
async def test_a_key_given_twice_stops_the_start_naming_the_file_the_key_and_its_line(
    tmp_path: Path, redis_server: RedisServer, setting: str, text: str, key: str, line: int
) -> None:
    path = tmp_path / "ops.yaml"
    path.write_text(text)
    settings = load_settings(
        {}, redis_url=redis_server.url, models_dir=str(tmp_path / "models"), **{setting: str(path)}
    )
    with pytest.raises(ConfigError) as refused:
        await build(settings)
    message = str(refused.value)
    assert message.startswith(f"{'fraud decision file' if 'decision' in setting else 'offer catalogue'} {path}: ")
    assert f"key {key} appears twice in one mapping" in message and f"at line {line} " in message, message


def test_the_shared_loader_names_the_key_and_where_it_repeats() -> None:
    with pytest.raises(DuplicateKey) as twice:
        load_strict("a: 1\nb:\n  c: 2\n  c: 3\n")
    assert (twice.value.key, twice.value.line, twice.value.column) == ("c", 4, 3)
    with pytest.raises(DuplicateKey, match="key 'c' appears twice in one object"):
        load_strict('{"a": {"c": 1, "c": 2}}', fmt="json")
    assert load_strict("base: &b {x: 1}\nown:\n  <<: *b\n  x: 2\n") == {"base": {"x": 1}, "own": {"x": 2}}


async def test_a_number_yaml_reads_as_octal_stops_the_start_naming_the_file_and_the_field(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """YAML 1.1 reads `limit: 010` as 8: a velocity rule would have fired two purchases early."""
    path = tmp_path / "decision.yaml"
    path.write_text("rules:\n- {name: many-returns, feature: member_returns_7d, limit: 010}\n")
    settings = load_settings(
        {}, redis_url=redis_server.url, models_dir=str(tmp_path / "models"), fraud_decision_file=str(path)
    )
    with pytest.raises(ConfigError) as refused:
        await build(settings)
    message = str(refused.value)
    assert message.startswith(f"fraud decision file {path}: ")
    assert "rules[0].limit: 010 is read by YAML as the octal number 8, not 10" in message, message


def test_the_shared_loader_refuses_numbers_yaml_reads_otherwise_than_written() -> None:
    for text, path in (("a: 0100", "a"), ("a: [1, {b: 1:40}]", "a[1].b"), ("x: 1_000", "x"), ("y: 0x10", "y")):
        with pytest.raises(AmbiguousNumber) as misread:
            load_strict(text)
        assert misread.value.path == path
    assert load_strict('ok: [0, 100, -3, "0100", 0.5]') == {"ok": [0, 100, -3, "0100", 0.5]}
