"""Artifacts: a trained model round-trips, a damaged one is refused, explanations are real."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fraud_svc.churn import CHURN_FEATURE_NAMES, churn_matrix, predict_churn
from fraud_svc.decide import DecisionConfig, assess, assess_batch, decide
from fraud_svc.domain import ModelUnavailable, TxContext, Verdict
from fraud_svc.features import FEATURE_NAMES, FeatureRow, featurize_matrix
from fraud_svc.model import METADATA_FILE, MODEL_FILE, Model, latest_artifact, load_artifact
from fraud_svc.synth import SynthConfig, generate
from fraud_svc.training import train_churn, train_fraud
from fraud_svc.velocity import MemoryVelocity


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    train_fraud(root, rows=15_000, seed=3)
    train_churn(root, members=2_000, seed=3)
    return root


@pytest.fixture(scope="module")
def fraud(models_dir: Path) -> Model:
    path = latest_artifact(models_dir, "fraud")
    assert path is not None
    return load_artifact(path, kind="fraud")


@pytest.fixture
def copy(fraud: Model, tmp_path: Path) -> Path:
    """A private copy of the fraud artifact to damage."""
    return Path(shutil.copytree(fraud.path, tmp_path / fraud.path.name))


def test_an_artifact_records_what_it_was_trained_on_and_how_it_did(fraud: Model) -> None:
    meta = fraud.metadata
    assert fraud.version == fraud.path.name == meta["version"]
    assert fraud.feature_names == FEATURE_NAMES
    assert meta["data"]["seed"] == 3 and len(meta["data"]["sha256"]) == 64
    assert meta["params"]["objective"] == "binary"
    for key in ("model_roc_auc", "model_pr_auc", "decision_pr_auc", "precision_at_review_budget", "holdout_rows"):
        assert key in meta["metrics"]
    assert set(meta["thresholds"]) == {"purchase", "redemption", "transfer", "return"}
    assert all(0 <= t["review"] <= t["deny"] <= 1 for t in meta["thresholds"].values())


def test_a_truncated_model_file_is_refused(copy: Path) -> None:
    model_file = copy / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(ModelUnavailable, match="checksum"):
        load_artifact(copy)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.999])
def test_a_truncated_model_with_a_forged_checksum_still_does_not_load(copy: Path, keep: float) -> None:
    """LightGBM itself can crash the process on a model cut mid-tree; it must never see one."""
    model_file = copy / MODEL_FILE
    raw = model_file.read_bytes()
    model_file.write_bytes(raw[: int(len(raw) * keep)])
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["model_sha256"] = hashlib.sha256(model_file.read_bytes()).hexdigest()
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelUnavailable, match=r"does not load|probe"):
        load_artifact(copy)


def test_a_model_for_another_feature_list_is_refused(copy: Path) -> None:
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["feature_names"] = [*meta["feature_names"][:-1], "feature_from_an_older_release"]
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelUnavailable, match="feature list"):
        load_artifact(copy)


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_missing_or_unreadable_metadata_is_refused(copy: Path, damage: str) -> None:
    if damage == "missing":
        (copy / METADATA_FILE).unlink()
    else:
        (copy / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelUnavailable, match="metadata"):
        load_artifact(copy)


def test_metadata_of_the_wrong_shape_is_refused_not_a_crash(copy: Path) -> None:
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["num_trees"] = None
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelUnavailable, match="num_trees a whole number"):
        load_artifact(copy)


def test_a_regression_booster_with_the_right_features_is_refused(copy: Path) -> None:
    """It would load and answer raw values (8.5 on a real row) read as probabilities."""
    model_file = copy / MODEL_FILE
    model_file.write_text(model_file.read_text().replace("objective=binary sigmoid:1", "objective=regression", 1))
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["model_sha256"] = hashlib.sha256(model_file.read_bytes()).hexdigest()
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelUnavailable, match="binary classifier"):
        load_artifact(copy)


def test_a_churn_artifact_is_not_loaded_as_a_fraud_model(models_dir: Path) -> None:
    churn = latest_artifact(models_dir, "churn")
    assert churn is not None
    with pytest.raises(ModelUnavailable, match="churn"):
        load_artifact(churn, kind="fraud")
    with pytest.raises(ModelUnavailable, match="no metadata"):
        load_artifact(models_dir / "nothing-here")


def test_predict_scores_a_batch_like_single_rows(fraud: Model) -> None:
    rows = featurize_matrix(list(generate(SynthConfig.for_rows(3_000, seed=4)).contexts()))[:200]
    batch = fraud.predict(rows)
    assert batch.shape == (200,) and ((batch >= 0) & (batch <= 1)).all()
    assert np.allclose(batch[:5], [fraud.predict(r.reshape(1, -1))[0] for r in rows[:5]])
    with pytest.raises(ValueError, match="features"):
        fraud.predict(rows[:, :10])


def test_explanations_name_real_features_that_raised_the_score(fraud: Model) -> None:
    rows = featurize_matrix(list(generate(SynthConfig.for_rows(15_000, seed=5)).contexts()))
    scores = fraud.predict(rows)
    risky = rows[int(np.argmax(scores))]
    reasons = fraud.explain(risky, top=3)
    assert 1 <= len(reasons) <= 3
    assert all(r.code.startswith("model:") and r.code[6:] in FEATURE_NAMES for r in reasons)
    weights = [r.weight for r in reasons]
    assert weights == sorted(weights, reverse=True) and weights[0] > 0
    contributions = fraud.booster.predict(risky.reshape(1, -1), pred_contrib=True)[0]
    assert weights[0] == pytest.approx(contributions[:-1].max(), abs=1e-3)
    logit = np.log(scores.max() / (1 - scores.max()))
    assert contributions.sum() == pytest.approx(logit, abs=1e-4)  # SHAP values add up to the score
    name = reasons[0].code[6:]
    assert reasons[0].text.startswith(name.replace("_", " "))


async def test_assess_explains_what_it_does_not_allow(fraud: Model) -> None:
    events = list(generate(SynthConfig.for_rows(15_000, seed=6)).contexts())
    config = DecisionConfig.from_model_metadata(fraud.metadata)
    batch = assess_batch(events, fraud, config)
    velocity = MemoryVelocity()
    one_by_one = [await assess(ctx, velocity, fraud, config) for ctx in events]
    assert [d.verdict for d in batch] == [d.verdict for d in one_by_one]
    assert [d.reasons for d in batch] == [d.reasons for d in one_by_one]
    flagged = [d for d in batch if d.verdict is not Verdict.ALLOW]
    assert flagged and all(any(r.code.startswith("model:") for r in d.reasons) for d in flagged if d.score > 0.5)
    assert all(d.model_version == fraud.version for d in batch)
    unscored = await assess(events[0], MemoryVelocity(), None, config)
    assert not unscored.scored and unscored.verdict is decide(events[0], _row(events[0]), None, (), config).verdict


def _row(ctx: TxContext) -> FeatureRow:
    return FeatureRow(tuple(featurize_matrix([ctx])[0].tolist()))


def test_churn_prediction_names_churn_factors(models_dir: Path) -> None:
    path = latest_artifact(models_dir, "churn")
    assert path is not None
    churn = load_artifact(path, kind="churn")
    assert churn.feature_names == CHURN_FEATURE_NAMES
    data = generate(SynthConfig(members=800, seed=9, days=400)).churn
    scores = churn.predict(churn_matrix(data.activities, data.as_of))
    member = data.activities[int(np.argmax(scores))]
    prediction = predict_churn(churn, member, data.as_of)
    assert prediction.member_id == member.member_id and prediction.model_version == churn.version
    assert prediction.probability == pytest.approx(scores.max())
    assert prediction.factors and all(f.code[6:] in CHURN_FEATURE_NAMES for f in prediction.factors)


def test_the_newest_artifact_is_found_by_name(models_dir: Path, fraud: Model) -> None:
    newer = train_fraud(models_dir, rows=4_000, seed=4)
    assert latest_artifact(models_dir, "fraud") == newer
    assert newer.name > fraud.path.name
    assert latest_artifact(models_dir / "empty", "fraud") is None
