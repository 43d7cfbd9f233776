"""Churn features from the ledger's member view, and prediction with top factors.

The features use only what `MemberActivity` carries (what the ledger can answer cheaply):
recency, purchase counts over 30/90/365 days and their trend, spend, unredeemed balance,
time since the last redemption, tenure, segment and tier. Trends are ratios of rates, so a
member who used to buy weekly and now buys monthly scores like one who never bought often
only where the data says so. The model itself is a LightGBM artifact of kind "churn"
(trained by `training.train_churn`, loaded by `model.load_artifact`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fraud_svc.domain import FUTURE_SKEW, BadRequest, ChurnPrediction, MemberActivity
from pointmesh.bounds import MAX_AMOUNT_MINOR, MAX_POINTS

if TYPE_CHECKING:
    from fraud_svc.model import Model

CHURN_SEGMENTS: tuple[str, ...] = ("regular", "family", "student", "business", "senior", "daily")
CHURN_TIERS: tuple[str, ...] = ("bronze", "silver", "gold", "platinum")

CHURN_FEATURE_NAMES: tuple[str, ...] = (
    "days_since_purchase", "days_since_redemption", "tenure_days",
    "purchases_30d", "purchases_90d", "purchases_365d",
    "trend_30d_vs_90d", "trend_90d_vs_365d",
    "spend_90d_minor", "basket_90d_minor", "balance_points", "balance_vs_spend_90d", "tier_rank",
    *(f"segment_{s}" for s in CHURN_SEGMENTS),
)  # fmt: skip

_DAY_S = 86_400.0
_NAN = math.nan


@dataclass(frozen=True, slots=True)
class ChurnRow:
    """One member's churn features, in CHURN_FEATURE_NAMES order."""

    values: tuple[float, ...]

    def __getitem__(self, name: str) -> float:
        return self.values[CHURN_FEATURE_NAMES.index(name)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(CHURN_FEATURE_NAMES, self.values, strict=True))

    def array(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.values, dtype=np.float64).reshape(1, -1)


def _days(since: datetime | None, as_of: datetime) -> float:
    return _NAN if since is None else max(0.0, (as_of - since).total_seconds() / _DAY_S)


# A member buying once a second all year round: counts past this are a bug upstream, not a
# member, and would reach the model as values no training row came near.
MAX_PURCHASES = 365 * 86_400
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COUNTS = ("purchases_30d", "purchases_90d", "purchases_365d")
_MOMENTS = ("member_since", "last_purchase_at", "last_redemption_at")
_SKEW_TEXT = f"{FUTURE_SKEW // timedelta(minutes=1)} minutes"


def check_activity(activity: MemberActivity, as_of: datetime) -> None:
    """Refuses (BadRequest naming the field, `activity.purchases_90d`) numbers no ledger can
    hold: negative or absurd counts, counts of a window larger than those of a window holding
    it, spend without purchases, amounts past the platform's bounds (pointmesh.bounds), and
    moments before 1970 or after `as_of` (a purchase 700,000 days ago is not a member drifting
    away). A last purchase may precede `member_since`: a late receipt can be claimed on joining."""
    if as_of.tzinfo is None:
        raise BadRequest("must carry a time zone", field="as_of")
    if as_of < _EPOCH:
        raise BadRequest(f"must not be before 1970-01-01, got {as_of.isoformat()}", field="as_of")
    a = activity
    for name in _COUNTS:
        count = getattr(a, name)
        if not 0 <= count <= MAX_PURCHASES:
            raise BadRequest(f"must lie within 0..{MAX_PURCHASES}, got {count}", field=f"activity.{name}")
    for narrow, wide in pairwise(_COUNTS):
        if getattr(a, narrow) > getattr(a, wide):
            raise BadRequest(f"must not exceed {wide} ({getattr(a, wide)}), whose window holds this one's, "
                             f"got {getattr(a, narrow)}", field=f"activity.{narrow}")  # fmt: skip
    if not 0 <= a.spend_90d_minor <= MAX_AMOUNT_MINOR:
        raise BadRequest(f"must lie within 0..{MAX_AMOUNT_MINOR} minor units, got {a.spend_90d_minor}",
                         field="activity.spend_90d_minor")  # fmt: skip
    if a.spend_90d_minor and not a.purchases_90d:
        raise BadRequest(f"{a.spend_90d_minor} minor units spent with no purchase in 90 days (purchases_90d is 0)",
                         field="activity.spend_90d_minor")  # fmt: skip
    if abs(a.balance_points) > MAX_POINTS:
        raise BadRequest(f"must lie within -{MAX_POINTS}..{MAX_POINTS}, got {a.balance_points}",
                         field="activity.balance_points")  # fmt: skip
    for name in _MOMENTS:
        moment = getattr(a, name)
        if moment is None:
            continue
        if moment.tzinfo is None:
            raise BadRequest("needs a time zone", field=f"activity.{name}")
        if not (moment >= _EPOCH and moment - FUTURE_SKEW <= as_of):  # as_of + skew may pass year 9999
            raise BadRequest(f"must lie between 1970-01-01 and {_SKEW_TEXT} after as_of ({as_of.isoformat()}), "
                             f"got {moment.isoformat()}", field=f"activity.{name}")  # fmt: skip


def churn_features(activity: MemberActivity, as_of: datetime) -> ChurnRow:
    """Features of one member as of `as_of` (the time the counts were taken)."""
    check_activity(activity, as_of)
    a = activity
    rate_90 = a.purchases_90d / 90
    rate_365 = a.purchases_365d / 365
    values = [
        _days(a.last_purchase_at, as_of), _days(a.last_redemption_at, as_of), _days(a.member_since, as_of),
        float(a.purchases_30d), float(a.purchases_90d), float(a.purchases_365d),
        (a.purchases_30d / 30) / rate_90 if rate_90 > 0 else _NAN,
        rate_90 / rate_365 if rate_365 > 0 else _NAN,
        float(a.spend_90d_minor), a.spend_90d_minor / a.purchases_90d if a.purchases_90d else _NAN,
        float(a.balance_points), a.balance_points / (a.spend_90d_minor / 100 + 1),
        float(CHURN_TIERS.index(a.tier)) if a.tier in CHURN_TIERS else _NAN,
        *(1.0 if a.segment == s else 0.0 for s in CHURN_SEGMENTS),
    ]  # fmt: skip
    return ChurnRow(tuple(values))


def churn_matrix(activities: Iterable[MemberActivity], as_of: datetime) -> npt.NDArray[np.float64]:
    rows = [churn_features(a, as_of).values for a in activities]
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(CHURN_FEATURE_NAMES))


def predict_churn(model: Model, activity: MemberActivity, as_of: datetime, *, top: int = 3) -> ChurnPrediction:
    """Churn probability of one member with the factors that raised it most."""
    row = churn_features(activity, as_of)
    probability = float(model.predict(row.array())[0])
    return ChurnPrediction(activity.member_id, probability, model.explain(row, top), model.version)
