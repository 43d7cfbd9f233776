"""A model whose trees point outside themselves is refused even with a matching checksum:
LightGBM's predict follows split features and child indices without bounds checks (a feature
past the row reads other memory, a bad child crashes the process or loops for ever)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from fraud_svc.domain import ModelUnavailable
from fraud_svc.features import FEATURE_NAMES
from fraud_svc.model import METADATA_FILE, MODEL_FILE, latest_artifact, load_artifact
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.velocity import MemoryVelocity


def _forge(artifact: Path, out: Path, line: str, edit: str) -> Path:
    """A copy of `artifact` whose first tree's `line` (e.g. "split_feature") is `edit`ed the
    way a careful forger would: tree_sizes and the checksum in the metadata agree with it."""
    copy = Path(shutil.copytree(artifact, out))
    text = (copy / MODEL_FILE).read_text()
    start = text.index("\nTree=0\n") + 1
    end = text.index("\n\n", start) + 1
    tree = text[start:end]
    old = re.search(rf"^{line}=(.*)$", tree, re.M)
    assert old is not None
    values = old.group(1).split()
    values[0] = edit
    forged = tree.replace(old.group(0), f"{line}={' '.join(values)}", 1)
    sizes = re.search(r"^tree_sizes=(.*)$", text, re.M)
    assert sizes is not None
    first, *rest = sizes.group(1).split()
    grown = int(first) + len(forged.encode()) - len(tree.encode())
    text = text[:start].replace(sizes.group(0), f"tree_sizes={' '.join([str(grown), *rest])}") + forged + text[end:]
    (copy / MODEL_FILE).write_text(text)
    meta = json.loads((copy / METADATA_FILE).read_text())
    meta["model_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    meta["version"] = copy.name
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    return copy


@pytest.fixture
def good(fraud_models: Path) -> Path:
    found = latest_artifact(fraud_models, "fraud")
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("line", "edit"),
    [
        pytest.param("split_feature", str(len(FEATURE_NAMES)), id="feature-one-past-the-row"),
        pytest.param("split_feature", "4000000", id="feature-far-past-the-row"),
        pytest.param("left_child", "9999", id="child-node-out-of-range"),
        pytest.param("left_child", "0", id="child-is-the-root-a-cycle"),
        pytest.param("right_child", "-999", id="leaf-out-of-range"),
        # A split marked categorical with no categories: predictions look right, but explaining a
        # row over it (every review or deny does) killed fraud_svc with SIGSEGV.
        pytest.param("decision_type", "1", id="split-marked-categorical"),
        pytest.param("decision_type", "12", id="missing-kind-lightgbm-does-not-define"),
        # A NaN leaf scores NaN, above no threshold: every row reaching it would be allowed.
        pytest.param("leaf_value", "nan", id="leaf-value-nan"),
        pytest.param("leaf_value", "inf", id="leaf-value-infinite"),
        pytest.param("threshold", "nan", id="threshold-nan"),
    ],
)
def test_a_tree_pointing_outside_itself_is_refused_with_a_forged_checksum(
    good: Path, tmp_path: Path, line: str, edit: str
) -> None:
    forged = _forge(good, tmp_path / f"{good.name}-forged", line, edit)
    with pytest.raises(ModelUnavailable, match="does not load"):
        load_artifact(forged, kind="fraud")


async def test_a_reload_of_such_a_model_leaves_the_serving_one_in_place(
    good: Path, fraud_models: Path, tmp_path: Path
) -> None:
    models = Path(shutil.copytree(fraud_models, tmp_path / "models"))
    service = FraudService(MemoryVelocity(), ModelSlot("fraud", models), ModelSlot("churn", models))
    service.load_at_start()
    serving = service.serving.model
    assert serving is not None and serving.path.name == good.name
    forged = _forge(good, models / f"{good.name}-zz-forged", "split_feature", str(len(FEATURE_NAMES) + 7))

    with pytest.raises(ModelUnavailable):
        await service.reload("fraud", str(forged))
    restarted = FraudService(MemoryVelocity(), ModelSlot("fraud", models), ModelSlot("churn", models))
    restarted.load_at_start()  # the forged one sorts newest: start-up falls back past it

    assert service.serving.model is serving
    assert restarted.serving.model is not None and restarted.serving.model.path.name == good.name
