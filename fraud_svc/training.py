"""Training on generated data: fraud (events) and churn (members), each to an artifact.

Fraud: generate ~`rows` events, featurize them in event-time order with the serving feature
code, drop the warm-up, split on *time* (the last quarter of scored events is held out), train
LightGBM on the first part, then on the held-out part measure ROC-AUC, PR-AUC and the
decision path's review rates and propose per-kind thresholds: the review threshold spends a
per-kind review budget (rule hits count against it), the deny threshold is the lowest score
whose held-out precision reaches `deny_precision`.

Churn: generate members over 15 months, take each active member's ledger view 90 days before
the end, label "no purchase in those 90 days", split members at random (one snapshot, so no
time to split on) and train the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from fraud_svc.churn import CHURN_FEATURE_NAMES, churn_matrix
from fraud_svc.decide import DecisionConfig, model_verdict, rule_hits, severity
from fraud_svc.domain import TxContext, TxKind
from fraud_svc.features import FEATURE_NAMES, FeatureRow, featurize_matrix
from fraud_svc.model import data_hash, save_artifact
from fraud_svc.synth import KINDS, PATTERNS, SynthConfig, generate

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

# Share of each kind's transactions ops can review; redemptions are the costly ones to hold.
REVIEW_BUDGETS: Mapping[TxKind, float] = {
    TxKind.PURCHASE: 0.02, TxKind.REDEMPTION: 0.018, TxKind.TRANSFER: 0.10, TxKind.RETURN: 0.04,
}  # fmt: skip
DENY_PRECISION = 0.97
# Below this score nothing is reviewed even if budget is left: a budget is a ceiling, not a quota.
MIN_REVIEW_SCORE = 0.02
HOLDOUT_SHARE = 0.25
CHURN_DAYS = 455


def fraud_params(seed: int) -> dict[str, Any]:
    """One thread: on a shared 2-core machine LightGBM's OpenMP threads spin against other
    processes and a 4 s fit takes a minute; single-threaded it stays 4 s."""
    return {
        "objective": "binary", "learning_rate": 0.08, "num_leaves": 31, "min_data_in_leaf": 30,
        "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
        "num_threads": 1, "seed": seed, "deterministic": True, "force_col_wise": True, "verbosity": -1,
        "num_boost_round": 200,
    }  # fmt: skip


def churn_params(seed: int) -> dict[str, Any]:
    return {
        "objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 40,
        "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
        "num_threads": 1, "seed": seed, "deterministic": True, "force_col_wise": True, "verbosity": -1,
        "num_boost_round": 200,
    }  # fmt: skip


def roc_auc(labels: npt.NDArray[np.generic], scores: Floats) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranked = np.asarray(scores)[order]
    ranks = np.empty(len(y), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]
    ends = np.r_[starts[1:], len(y)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def pr_auc(labels: npt.NDArray[np.generic], scores: Floats) -> float:
    """Average precision: precision at each distinct threshold weighted by the recall gained."""
    y = np.asarray(labels, dtype=bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, yy = np.asarray(scores)[order], y[order]
    tp, fp = np.cumsum(yy), np.cumsum(~yy)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    precision, recall = tp[last] / (tp[last] + fp[last]), tp[last] / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def decision_rank(severity: npt.NDArray[np.integer[Any]], scores: Floats) -> Floats:
    """One number ordering decisions as served: deny above review above allow, then by score."""
    return np.asarray(severity, np.float64) * 2.0 + np.asarray(scores, np.float64)


def _kind_codes(contexts: list[TxContext]) -> npt.NDArray[np.int64]:
    return np.asarray([KINDS.index(c.kind) for c in contexts], dtype=np.int64)


def rule_severity(contexts: list[TxContext], matrix: Floats, config: DecisionConfig) -> npt.NDArray[np.int64]:
    """Most severe rule verdict per row (0 none, 1 review, 2 deny)."""
    out = np.zeros(len(contexts), dtype=np.int64)
    for i, ctx in enumerate(contexts):
        hits = rule_hits(ctx, FeatureRow(tuple(matrix[i].tolist())), config)
        if hits:
            out[i] = max(severity(v) for v, _ in hits)
    return out


def propose_thresholds(
    kinds: npt.NDArray[np.int64], scores: Floats, labels: Bools, rules: npt.NDArray[np.int64],
    budgets: Mapping[TxKind, float] = REVIEW_BUDGETS, deny_precision: float = DENY_PRECISION,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per kind: the review threshold that fills at most the review budget after rule hits
    (never below MIN_REVIEW_SCORE), and the lowest deny threshold with held-out precision >=
    deny_precision (1.0 if none), raised to the review threshold so that reviews and denies
    together stay within the budget."""
    out: dict[str, dict[str, float]] = {}
    for code, kind in enumerate(KINDS):
        mine = kinds == code
        s, y, r = scores[mine], labels[mine], rules[mine]
        room = int(budgets[kind] * len(s)) - int((r > 0).sum())
        free = np.sort(s[r == 0])[::-1]
        review = 1.0 if room <= 0 or len(free) == 0 else float(free[min(room, len(free)) - 1])
        review = max(review, MIN_REVIEW_SCORE)
        deny = 1.0
        order = np.argsort(-s, kind="mergesort")
        precision = np.cumsum(y[order]) / np.arange(1, len(s) + 1)
        ok = np.flatnonzero((precision >= deny_precision) & (np.cumsum(y[order]) >= 10))
        if len(ok):
            deny = float(s[order][ok[-1]])
        out[kind.value] = {"review": round(review, 6), "deny": round(max(deny, review), 6)}
    return out


def _split_by_time(t_ms: npt.NDArray[np.int64], scored: Bools) -> tuple[Bools, Bools]:
    cut = np.quantile(t_ms[scored], 1 - HOLDOUT_SHARE)
    return scored & (t_ms < cut), scored & (t_ms >= cut)


def train_fraud(out_dir: Path | str, *, rows: int = 50_000, seed: int = 0) -> Path:
    """Generates ~`rows` events with `seed`, trains and evaluates the fraud model and writes
    an artifact under `out_dir`; returns its directory."""
    started = time.monotonic()
    data = generate(SynthConfig.for_rows(rows, seed=seed))
    matrix = featurize_matrix(data.contexts())
    labels = data.label
    train, hold = _split_by_time(data.t_ms, data.scored)
    params = fraud_params(seed)
    booster = _fit(params, matrix[train], labels[train])
    scores = np.asarray(booster.predict(matrix[hold]), dtype=np.float64)
    held = [c for c, h in zip(data.contexts(), hold.tolist(), strict=True) if h]
    kinds, rules = _kind_codes(held), rule_severity(held, matrix[hold], DecisionConfig())
    thresholds = propose_thresholds(kinds, scores, labels[hold], rules)
    config = DecisionConfig.from_mapping({"thresholds": thresholds})
    metrics = _fraud_metrics(kinds, scores, labels[hold], rules, data.pattern[hold], config)
    metrics["train_rows"], metrics["holdout_rows"] = int(train.sum()), int(hold.sum())
    metrics["seconds"] = round(time.monotonic() - started, 2)
    info = {"generator": "fraud_svc.synth", "seed": seed, "rows": len(data), "members": data.config.members,
            "sha256": data_hash(matrix[train], labels[train])}  # fmt: skip
    path = save_artifact(
        out_dir, booster, kind="fraud", data=info, params=params, metrics=metrics, thresholds=thresholds
    )
    log.info("fraud model %s trained on %d rows in %.1fs", path.name, len(data), metrics["seconds"])
    return path


def _fit(params: Mapping[str, Any], x: Floats, y: Bools, names: tuple[str, ...] = FEATURE_NAMES) -> lgb.Booster:
    rounds = int(params["num_boost_round"])
    core = {k: v for k, v in params.items() if k != "num_boost_round"}
    data = lgb.Dataset(x, y.astype(np.float64), feature_name=list(names), free_raw_data=True)
    return lgb.train(core, data, num_boost_round=rounds)


def _fraud_metrics(
    kinds: npt.NDArray[np.int64], scores: Floats, labels: Bools, rules: npt.NDArray[np.int64],
    patterns: npt.NDArray[np.int64], config: DecisionConfig,
) -> dict[str, Any]:  # fmt: skip
    verdicts = np.asarray(
        [max(int(r), severity(model_verdict(KINDS[k], float(s), config))) for k, s, r in
         zip(kinds.tolist(), scores.tolist(), rules.tolist(), strict=True)]
    )  # fmt: skip
    flagged = verdicts > 0
    redemption = kinds == KINDS.index(TxKind.REDEMPTION)
    ato = redemption & (patterns == PATTERNS.index("account_takeover"))
    return {
        "model_roc_auc": roc_auc(labels, scores), "model_pr_auc": pr_auc(labels, scores),
        "decision_pr_auc": pr_auc(labels, decision_rank(verdicts, scores)),
        "fraud_share": float(labels.mean()),
        "flagged_share": {k.value: float(flagged[kinds == i].mean()) if (kinds == i).any() else 0.0
                          for i, k in enumerate(KINDS)},
        "precision_at_review_budget": {k.value: float(labels[(kinds == i) & flagged].mean())
                                       if ((kinds == i) & flagged).any() else 0.0 for i, k in enumerate(KINDS)},
        "recall_at_review_budget": float(flagged[labels].mean()) if labels.any() else 0.0,
        "ato_redemptions": int(ato.sum()),
        "ato_redemption_catch_rate": float(flagged[ato].mean()) if ato.any() else 0.0,
        "redemption_review_rate": float(flagged[redemption].mean()) if redemption.any() else 0.0,
    }  # fmt: skip


def train_churn(out_dir: Path | str, *, members: int = 5_000, seed: int = 0) -> Path:
    """Generates `members` members over 15 months, trains and evaluates the churn model and
    writes an artifact under `out_dir`; returns its directory."""
    started = time.monotonic()
    data = generate(SynthConfig(members=members, seed=seed, days=CHURN_DAYS))
    churn = data.churn
    matrix = churn_matrix(churn.activities, churn.as_of)
    labels = churn.churned
    hold = np.random.default_rng(seed).random(len(labels)) < HOLDOUT_SHARE
    params = churn_params(seed)
    booster = _fit(params, matrix[~hold], labels[~hold], CHURN_FEATURE_NAMES)
    scores = np.asarray(booster.predict(matrix[hold]), dtype=np.float64)
    metrics = {
        "roc_auc": roc_auc(labels[hold], scores), "pr_auc": pr_auc(labels[hold], scores),
        "churn_share": float(labels.mean()), "train_members": int((~hold).sum()), "holdout_members": int(hold.sum()),
        "seconds": round(time.monotonic() - started, 2),
    }  # fmt: skip
    info = {"generator": "fraud_svc.synth", "seed": seed, "members": len(labels), "as_of": churn.as_of.isoformat(),
            "sha256": data_hash(matrix[~hold], labels[~hold])}  # fmt: skip
    path = save_artifact(out_dir, booster, kind="churn", data=info, params=params, metrics=metrics)
    log.info("churn model %s trained on %d members in %.1fs", path.name, len(labels), metrics["seconds"])
    return path
