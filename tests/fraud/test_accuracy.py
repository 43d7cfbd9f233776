"""Acceptance: the served decision path on data from a seed it was not trained on.

Trains on ~100k generated events (seed 11) and judges the decisions `assess_batch` serves
(the same featurize -> predict -> decide as `assess`) on ~150k events generated with seed 12,
excluding each set's warm-up. Fraud labels carry the generator's label noise; the pattern
names (the truth) pick the account-takeover redemptions and the benign look-alikes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fraud_svc.churn import churn_matrix
from fraud_svc.decide import DecisionConfig, assess_batch, severity
from fraud_svc.features import FEATURE_INDEX
from fraud_svc.model import Model, load_artifact
from fraud_svc.synth import SynthConfig, SynthData, generate
from fraud_svc.training import CHURN_DAYS, decision_rank, pr_auc, roc_auc, train_churn, train_fraud

TRAIN_ROWS, TEST_ROWS = 100_000, 150_000
TRAIN_SEED, TEST_SEED = 11, 12
REDEMPTION = 1
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class HeldOut:
    data: SynthData
    features: npt.NDArray[np.float64]  # scored rows only, like everything below
    labels: Mask
    scores: npt.NDArray[np.float64]
    severity: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int64]
    patterns: npt.NDArray[np.str_]

    @property
    def flagged(self) -> Mask:
        return np.asarray(self.severity > 0)

    def feature(self, name: str) -> npt.NDArray[np.float64]:
        return self.features[:, FEATURE_INDEX[name]]


@pytest.fixture(scope="module")
def fraud_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return load_artifact(train_fraud(tmp_path_factory.mktemp("models"), rows=TRAIN_ROWS, seed=TRAIN_SEED))


@pytest.fixture(scope="module")
def held_out(fraud_model: Model) -> HeldOut:
    data = generate(SynthConfig.for_rows(TEST_ROWS, seed=TEST_SEED))
    contexts = list(data.contexts())
    decisions = assess_batch(contexts, fraud_model, DecisionConfig.from_model_metadata(fraud_model.metadata))
    scored = data.scored
    rows = np.asarray(
        [[d.features[name] for name in FEATURE_INDEX] for d, s in zip(decisions, scored, strict=False) if s]
    )
    return HeldOut(
        data=data, features=rows, labels=data.label[scored],
        scores=np.asarray([d.score for d in decisions])[scored],
        severity=np.asarray([severity(d.verdict) for d in decisions])[scored],
        kind=data.kind[scored], patterns=np.asarray(data.pattern_names())[scored],
    )  # fmt: skip


def test_decision_path_reaches_pr_auc_080_on_another_seed(held_out: HeldOut) -> None:
    h = held_out
    decision_pr_auc = pr_auc(h.labels, decision_rank(h.severity, h.scores))
    print(f"\nheld-out rows {len(h.labels)}, fraud share {h.labels.mean():.4f}, decision PR-AUC {decision_pr_auc:.4f}, "
          f"model PR-AUC {pr_auc(h.labels, h.scores):.4f}, ROC-AUC {roc_auc(h.labels, h.scores):.4f}")  # fmt: skip
    assert decision_pr_auc >= 0.80


def test_catches_90pct_of_account_takeover_redemptions_reviewing_at_most_2pct(held_out: HeldOut) -> None:
    h = held_out
    redemptions = h.kind == REDEMPTION
    takeover = redemptions & (h.patterns == "account_takeover")
    catch_rate = h.flagged[takeover].mean()
    review_rate = h.flagged[redemptions].mean()  # reviews and denies, look-alikes included
    print(f"\nATO redemptions {takeover.sum()}, caught {catch_rate:.3f}; redemptions {redemptions.sum()}, "
          f"flagged {review_rate:.4f} (review only {(h.severity[redemptions] == 1).mean():.4f})")  # fmt: skip
    assert takeover.sum() >= 50, "too few takeovers in the held-out set to judge"
    assert catch_rate >= 0.90
    assert review_rate <= 0.02


NaiveRule = Callable[[HeldOut], Mask]
FAMILIES: dict[str, tuple[str, tuple[str, ...], NaiveRule]] = {
    "takeover": ("account_takeover", ("new_phone", "household_transfer"),
                 lambda h: (h.kind == REDEMPTION) & (h.feature("points_share_of_balance") >= 0.7)
                 & (h.feature("member_device_age_hours") <= 48)),
    "burst": ("burst", ("black_friday_burst", "payday_burst", "split_receipts"),
              lambda h: h.feature("member_purchases_1h") >= 4),
    "ring": ("transfer_ring", ("household_transfer",),
             lambda h: (h.kind == 2) & (h.feature("points_share_of_balance") >= 0.9)),
    "returns": ("return_fraud", ("serial_returner", "benign"),
                lambda h: (h.kind == 3) & np.isnan(h.feature("member_store_age_days"))),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_benign_lookalikes_defeat_a_naive_rule_but_not_the_decision_path(held_out: HeldOut, family: str) -> None:
    """The look-alikes matter: the obvious single rule for each fraud pattern drowns in them."""
    h = held_out
    fraud_pattern, lookalikes, naive = FAMILIES[family]
    fraud, alike = h.patterns == fraud_pattern, np.isin(h.patterns, lookalikes)
    hits = naive(h)
    naive_precision = (hits & fraud).sum() / max(1, (hits & (fraud | alike)).sum())
    served_precision = (h.flagged & fraud).sum() / max(1, (h.flagged & (fraud | alike)).sum())
    print(f"\n{family}: naive rule catches {hits[fraud].mean():.2f} at precision {naive_precision:.2f} against "
          f"{', '.join(lookalikes)}; served path catches {h.flagged[fraud].mean():.2f} at {served_precision:.2f}")  # fmt: skip
    assert hits[alike].sum() > hits[fraud].sum() * 0.5, "the look-alikes should trip the naive rule"
    assert naive_precision < 0.5
    assert served_precision >= min(0.9, 2 * naive_precision) and h.flagged[fraud].mean() > 0.8


def test_churn_model_reaches_roc_auc_080_on_another_seed(tmp_path: Path) -> None:
    model = load_artifact(train_churn(tmp_path, members=6_000, seed=TRAIN_SEED), kind="churn")
    churn = generate(SynthConfig(members=6_000, seed=TEST_SEED, days=CHURN_DAYS)).churn
    auc = roc_auc(churn.churned, model.predict(churn_matrix(churn.activities, churn.as_of)))
    print(f"\nchurn: {len(churn.activities)} members, churned {churn.churned.mean():.3f}, ROC-AUC {auc:.4f}")
    assert auc >= 0.80
