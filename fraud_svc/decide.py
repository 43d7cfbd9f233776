"""From features and a model score to allow / review / deny, with reasons.

Rules come first and are deterministic: a blocked device is denied, and a velocity rule (a
limit on one feature, for some transaction kinds) reviews or denies whatever the model says.
Then the model score is compared with the thresholds of the transaction's kind. The final
verdict is the most severe of the two layers, so the model can escalate a rule's review to a
deny but can never relax a rule. Reasons list rule hits first, then the model's top feature
contributions. Without a score (no model loaded) rules still apply and `unscored_verdict`
decides the rest.

Everything here is configuration: training proposes per-kind thresholds (in the artifact's
metadata); `DecisionConfig.from_mapping` reads operator overrides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fraud_svc.domain import BadRequest, Decision, Reason, TxContext, TxKind, Verdict
from fraud_svc.features import FEATURE_INDEX, FeatureRow, featurize, featurize_matrix
from fraud_svc.model import Model
from fraud_svc.velocity import MemoryVelocity, Velocity

_SEVERITY = {Verdict.ALLOW: 0, Verdict.REVIEW: 1, Verdict.DENY: 2}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Model score at or above `review` is reviewed, at or above `deny` denied (1.0: never)."""

    review: float
    deny: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.review <= self.deny <= 1.0:
            raise BadRequest(f"need 0 <= review <= deny <= 1, got {self.review} and {self.deny}", field="thresholds")


@dataclass(frozen=True, slots=True)
class VelocityRule:
    """Hits when `feature` exceeds `limit` on a transaction of one of `kinds` (empty: all)."""

    name: str
    feature: str
    limit: float
    verdict: Verdict = Verdict.REVIEW
    kinds: frozenset[TxKind] = frozenset()

    def __post_init__(self) -> None:
        if self.feature not in FEATURE_INDEX:
            raise BadRequest(f"rule {self.name!r}: unknown feature {self.feature!r}", field="rules.feature")
        if self.verdict is Verdict.ALLOW:
            raise BadRequest(f"rule {self.name!r}: a rule reviews or denies", field="rules.verdict")
        if not math.isfinite(self.limit):  # NaN never compares greater: the rule would never fire
            raise BadRequest(
                f"rule {self.name!r}: limit must be a finite number, got {self.limit}", field="rules.limit"
            )

    def hit(self, kind: TxKind, features: FeatureRow) -> bool:
        if self.kinds and kind not in self.kinds:
            return False
        value = features.values[FEATURE_INDEX[self.feature]]
        return not math.isnan(value) and value > self.limit


_EARN = frozenset({TxKind.PURCHASE, TxKind.RETURN})
_SPEND = frozenset({TxKind.REDEMPTION, TxKind.TRANSFER})

# Limits sit above what the benign look-alikes reach (Black Friday sessions, households,
# busy cashiers) in generated data; docs/fraud.md has the measured rates.
DEFAULT_RULES: tuple[VelocityRule, ...] = (
    VelocityRule("velocity_member_purchases_10m", "member_purchases_10m", 8, kinds=frozenset({TxKind.PURCHASE})),
    VelocityRule("velocity_member_purchases_1h", "member_purchases_1h", 15, kinds=frozenset({TxKind.PURCHASE})),
    VelocityRule("velocity_card_members_24h", "card_members_24h", 3, kinds=_EARN),
    VelocityRule("velocity_employee_member_24h", "employee_member_events_24h", 10, kinds=frozenset({TxKind.PURCHASE})),
    VelocityRule(
        "velocity_member_transfers_out_24h", "member_transfers_out_24h", 5, kinds=frozenset({TxKind.TRANSFER})
    ),
    VelocityRule(
        "velocity_recipient_senders_7d", "recipient_transfer_senders_7d", 4, kinds=frozenset({TxKind.TRANSFER})
    ),
    VelocityRule("velocity_member_returns_7d", "member_returns_7d", 5, kinds=frozenset({TxKind.RETURN})),
    VelocityRule("velocity_device_new_members_30d", "device_new_members_30d", 2, kinds=_SPEND),
)
DEFAULT_THRESHOLDS: Mapping[TxKind, Thresholds] = {kind: Thresholds(0.5, 0.95) for kind in TxKind}


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    thresholds: Mapping[TxKind, Thresholds] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    rules: tuple[VelocityRule, ...] = DEFAULT_RULES
    blocked_devices: frozenset[str] = frozenset()
    unscored_verdict: Verdict = Verdict.ALLOW

    def thresholds_for(self, kind: TxKind) -> Thresholds:
        return self.thresholds.get(kind) or DEFAULT_THRESHOLDS[kind]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: DecisionConfig | None = None) -> DecisionConfig:
        """Reads {"thresholds": {"redemption": {"review": .., "deny": ..}}, "rules": [{"name", "feature",
        "limit", "verdict", "kinds"}], "blocked_devices": [..], "unscored_verdict": "allow"}; keys left
        out keep `base` (default: DecisionConfig()). Errors name the bad field."""
        base = base or cls()
        thresholds = dict(base.thresholds)
        for kind_name, value in _mapping(data.get("thresholds", {}), "thresholds").items():
            kind = _enum(TxKind, kind_name, "thresholds")
            current = base.thresholds_for(kind)
            given = _mapping(value, "thresholds")
            thresholds[kind] = Thresholds(
                _number(given.get("review", current.review), "thresholds"),
                _number(given.get("deny", current.deny), "thresholds"),
            )
        rules = tuple(_rule(r) for r in data["rules"]) if "rules" in data else base.rules
        blocked = _devices(data["blocked_devices"]) if "blocked_devices" in data else base.blocked_devices
        unscored = _enum(Verdict, data.get("unscored_verdict", base.unscored_verdict), "unscored_verdict")
        return cls(thresholds, rules, blocked, unscored)

    @classmethod
    def from_model_metadata(cls, metadata: Mapping[str, Any], **overrides: Any) -> DecisionConfig:
        """Thresholds the training run proposed, then operator `overrides` on top (per kind)."""
        proposed = cls.from_mapping({"thresholds": metadata.get("thresholds", {})})
        return cls.from_mapping(overrides, base=proposed)


def _mapping(value: object, field_name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadRequest(f"{field_name}: expected a mapping, got {value!r}", field=field_name)
    return value


def _number(value: object, field_name: str) -> float:
    """A finite number (or its text): NaN and infinities would silently disable a limit."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BadRequest(f"{field_name}: {value!r} is not a number", field=field_name) from None
    except OverflowError:  # a whole number too large for a float (a typo of digits)
        raise BadRequest(f"{field_name}: {str(value)[:20]}... is not a finite number", field=field_name) from None
    if not math.isfinite(number):
        raise BadRequest(f"{field_name}: {value!r} is not a finite number", field=field_name)
    return number


def _devices(value: object) -> frozenset[str]:
    """A list of device ids; a bare string would otherwise become a set of its characters."""
    if not isinstance(value, list | tuple | set | frozenset) or not all(isinstance(d, str) for d in value):
        raise BadRequest(f"blocked_devices: expected a list of device ids, got {value!r}", field="blocked_devices")
    return frozenset(value)


def _rule(data: object) -> VelocityRule:
    rule = _mapping(data, "rules")
    missing = [k for k in ("name", "feature", "limit") if k not in rule]
    if missing:
        raise BadRequest(f"rules: a rule needs {', '.join(missing)}", field="rules")
    return VelocityRule(
        str(rule["name"]),
        str(rule["feature"]),
        _number(rule["limit"], "rules.limit"),
        _enum(Verdict, rule.get("verdict", "review"), "rules.verdict"),
        frozenset(_enum(TxKind, k, "rules.kinds") for k in rule.get("kinds", ())),
    )


def _enum(enum: type[TxKind] | type[Verdict], value: object, field_name: str) -> Any:
    try:
        return enum(str(value))
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise BadRequest(f"{field_name}: {value!r} is not one of {allowed}", field=field_name) from None


def rule_hits(ctx: TxContext, features: FeatureRow, config: DecisionConfig) -> list[tuple[Verdict, Reason]]:
    """The deterministic layer alone: every rule that fires on this transaction."""
    hits: list[tuple[Verdict, Reason]] = []
    if ctx.device_id and ctx.device_id in config.blocked_devices:
        hits.append((Verdict.DENY, Reason("rule:blocked_device", f"device {ctx.device_id} is blocked")))
    for rule in config.rules:
        if rule.hit(ctx.kind, features):
            value = features.values[FEATURE_INDEX[rule.feature]]
            text = f"{rule.feature.replace('_', ' ')} = {value:g} exceeds {rule.limit:g}"
            hits.append((rule.verdict, Reason(f"rule:{rule.name}", text)))
    return hits


def model_verdict(kind: TxKind, score: float, config: DecisionConfig) -> Verdict:
    limits = config.thresholds_for(kind)
    if score >= limits.deny:
        return Verdict.DENY
    return Verdict.REVIEW if score >= limits.review else Verdict.ALLOW


def decide(
    ctx: TxContext,
    features: FeatureRow,
    score: float | None,
    contributions: Sequence[Reason],
    config: DecisionConfig,
    *,
    model_version: str = "",
) -> Decision:
    """The served decision: rules, then thresholds on `score` (None: no model available)."""
    hits = rule_hits(ctx, features, config)
    verdict = max((v for v, _ in hits), key=_SEVERITY.__getitem__, default=Verdict.ALLOW)
    if score is None:
        verdict = max(verdict, config.unscored_verdict, key=_SEVERITY.__getitem__)
    else:
        verdict = max(verdict, model_verdict(ctx.kind, score, config), key=_SEVERITY.__getitem__)
    return Decision(
        event_id=ctx.event_id, verdict=verdict, score=0.0 if score is None else float(score),
        reasons=(*(r for _, r in hits), *contributions), model_version=model_version,
        scored=score is not None, features=features.as_dict(),
    )  # fmt: skip


def severity(verdict: Verdict) -> int:
    """0 allow, 1 review, 2 deny: the order in which decisions rank transactions."""
    return _SEVERITY[verdict]


async def assess(
    ctx: TxContext, velocity: Velocity, model: Model | None, config: DecisionConfig, *, top: int = 3
) -> Decision:
    """The whole served path for one transaction: featurize (recording it in `velocity`),
    score, decide. Explanations (SHAP, ~1 ms) are computed only when the verdict is not
    allow, since only reviews and denies are read by people."""
    features = await featurize(ctx, velocity)
    if model is None:
        return decide(ctx, features, None, (), config)
    score = float(model.predict(features.array())[0])
    decision = decide(ctx, features, score, (), config, model_version=model.version)
    if decision.verdict is Verdict.ALLOW:
        return decision
    return decide(ctx, features, score, model.explain(features, top), config, model_version=model.version)


def assess_batch(
    contexts: Sequence[TxContext],
    model: Model,
    config: DecisionConfig,
    *,
    velocity: MemoryVelocity | None = None,
    top: int = 3,
) -> list[Decision]:
    """`assess` for many transactions in event-time order against in-process state (replays,
    evaluation): the same features, scores and `decide`, batched through the model."""
    matrix = featurize_matrix(contexts, velocity)
    scores = model.predict(matrix).tolist() if len(matrix) else []
    rows = [FeatureRow(tuple(r)) for r in matrix.tolist()]
    decisions = [
        decide(ctx, row, score, (), config, model_version=model.version)
        for ctx, row, score in zip(contexts, rows, scores, strict=True)
    ]
    flagged = [i for i, d in enumerate(decisions) if d.verdict is not Verdict.ALLOW]
    if flagged:
        explained = model.explain_many(matrix[flagged], top)
        for i, reasons in zip(flagged, explained, strict=True):
            decisions[i] = decide(contexts[i], rows[i], scores[i], reasons, config, model_version=model.version)
    return decisions
