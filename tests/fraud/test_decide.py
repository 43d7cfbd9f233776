"""Decisions: rules before the model, per-kind thresholds, configuration errors by field."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from fraud_svc.decide import DEFAULT_RULES, DecisionConfig, Thresholds, VelocityRule, decide
from fraud_svc.domain import BadRequest, Reason, TxContext, TxKind, Verdict
from fraud_svc.features import FEATURE_INDEX, FEATURE_NAMES, FeatureRow

CONFIG = DecisionConfig(
    thresholds={TxKind.PURCHASE: Thresholds(0.6, 0.9), TxKind.REDEMPTION: Thresholds(0.2, 0.8)},
    blocked_devices=frozenset({"stolen-phone"}),
)
CONTRIBUTION = (Reason("model:member_device_age_hours", "member device age hours = 0", 1.7),)


def ctx(kind: TxKind = TxKind.PURCHASE, device: str = "phone") -> TxContext:
    return TxContext("e1", kind, "m1", datetime(2026, 1, 5, 10, tzinfo=UTC), device_id=device)


def row(**values: float) -> FeatureRow:
    data = [math.nan] * len(FEATURE_NAMES)
    for name, value in values.items():
        data[FEATURE_INDEX[name]] = value
    return FeatureRow(tuple(data))


def test_a_blocked_device_is_denied_whatever_the_score() -> None:
    decision = decide(ctx(device="stolen-phone"), row(), 0.01, CONTRIBUTION, CONFIG)
    assert decision.verdict is Verdict.DENY
    assert decision.reasons[0].code == "rule:blocked_device"
    assert decision.reasons[1:] == CONTRIBUTION
    assert decision.score == 0.01 and decision.scored


def test_a_velocity_rule_reviews_a_low_score_and_the_model_can_escalate_it_to_deny() -> None:
    burst = row(member_purchases_10m=12)
    low = decide(ctx(), burst, 0.05, (), CONFIG)
    assert low.verdict is Verdict.REVIEW
    assert [r.code for r in low.reasons] == ["rule:velocity_member_purchases_10m"]
    assert "12" in low.reasons[0].text
    assert decide(ctx(), burst, 0.95, (), CONFIG).verdict is Verdict.DENY


def test_a_rule_only_applies_to_its_kinds() -> None:
    assert decide(ctx(TxKind.REDEMPTION), row(member_purchases_10m=12), 0.0, (), CONFIG).verdict is Verdict.ALLOW


def test_thresholds_are_per_kind() -> None:
    assert decide(ctx(TxKind.PURCHASE), row(), 0.3, (), CONFIG).verdict is Verdict.ALLOW
    assert decide(ctx(TxKind.REDEMPTION), row(), 0.3, (), CONFIG).verdict is Verdict.REVIEW
    assert decide(ctx(TxKind.REDEMPTION), row(), 0.8, (), CONFIG).verdict is Verdict.DENY


def test_without_a_score_rules_still_apply_and_the_unscored_verdict_decides_the_rest() -> None:
    closed = DecisionConfig(unscored_verdict=Verdict.REVIEW)
    quiet = decide(ctx(), row(), None, (), closed)
    assert quiet.verdict is Verdict.REVIEW and not quiet.scored and quiet.score == 0.0
    assert decide(ctx(), row(), None, (), DecisionConfig()).verdict is Verdict.ALLOW
    assert decide(ctx(), row(card_members_24h=9), None, (), DecisionConfig()).verdict is Verdict.REVIEW


def test_the_decision_carries_the_features_it_was_made_on() -> None:
    decision = decide(ctx(), row(member_purchases_10m=3), 0.1, (), CONFIG)
    assert decision.features["member_purchases_10m"] == 3
    assert set(decision.features) == set(FEATURE_NAMES)


def test_configuration_overrides_thresholds_rules_and_blocked_devices() -> None:
    config = DecisionConfig.from_mapping({
        "thresholds": {"return": {"review": 0.1}},
        "rules": [{"name": "many_returns", "feature": "member_returns_7d", "limit": 2, "verdict": "deny",
                   "kinds": ["return"]}],
        "blocked_devices": ["d1"],
    }, base=CONFIG)  # fmt: skip
    assert config.thresholds_for(TxKind.RETURN) == Thresholds(0.1, 0.95)
    assert config.thresholds_for(TxKind.PURCHASE) == Thresholds(0.6, 0.9)
    assert config.rules == (
        VelocityRule("many_returns", "member_returns_7d", 2, Verdict.DENY, frozenset({TxKind.RETURN})),
    )
    assert config.blocked_devices == frozenset({"d1"})
    assert decide(ctx(TxKind.RETURN), row(member_returns_7d=3), 0.0, (), config).verdict is Verdict.DENY


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rules": [{"name": "x", "feature": "no_such_feature", "limit": 1}]}, "rules.feature"),
        ({"rules": [{"name": "x", "feature": "points", "limit": 1, "verdict": "allow"}]}, "rules.verdict"),
        ({"rules": [{"name": "x", "feature": "points", "limit": 1, "kinds": ["refund"]}]}, "rules.kinds"),
        ({"thresholds": {"refund": {"review": 0.1}}}, "thresholds"),
        ({"thresholds": {"purchase": {"review": 0.9, "deny": 0.5}}}, "thresholds"),
        ({"unscored_verdict": "maybe"}, "unscored_verdict"),
        ({"rules": [{"feature": "points"}]}, "rules"),
        ({"rules": [{"name": "x", "feature": "points", "limit": "many"}]}, "rules.limit"),
        ({"thresholds": {"purchase": 0.5}}, "thresholds"),
    ],
)
def test_bad_configuration_is_refused_naming_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(BadRequest) as refused:
        DecisionConfig.from_mapping(data)
    assert refused.value.field == field


def test_default_rules_name_real_features_and_the_metadata_supplies_thresholds() -> None:
    assert all(rule.feature in FEATURE_INDEX for rule in DEFAULT_RULES)
    metadata = {"thresholds": {"redemption": {"review": 0.3, "deny": 0.7}, "return": {"review": 0.2, "deny": 0.9}}}
    config = DecisionConfig.from_model_metadata(metadata, thresholds={"return": {"deny": 0.5}})
    assert config.thresholds_for(TxKind.REDEMPTION) == Thresholds(0.3, 0.7)
    assert config.thresholds_for(TxKind.RETURN) == Thresholds(0.2, 0.5)
    assert config.rules == DEFAULT_RULES
