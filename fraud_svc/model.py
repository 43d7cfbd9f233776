"""Versioned LightGBM artifacts: write, validate on load, predict and explain.

An artifact is a directory `<kind>-<UTC time>-<hash>/` holding `model.txt` (LightGBM's text
format) and `metadata.json` (format, kind, version, feature list, model checksum, training
data hash, parameters, held-out metrics, proposed thresholds). Names sort by creation time,
so the newest is the last. `load_artifact` refuses anything it cannot fully trust — missing
or unreadable files (the file system's refusals included), a feature list other than the
code's, a checksum mismatch, a model that does not load or does not predict a probe row — with
`ModelUnavailable`, so a bad file never replaces a serving model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from fraud_svc.churn import CHURN_FEATURE_NAMES, ChurnRow
from fraud_svc.domain import ModelUnavailable, Reason
from fraud_svc.features import FEATURE_NAMES, FeatureRow

ARTIFACT_FORMAT = 1
MODEL_FILE = "model.txt"
METADATA_FILE = "metadata.json"
EXPECTED_FEATURES: Mapping[str, tuple[str, ...]] = {"fraud": FEATURE_NAMES, "churn": CHURN_FEATURE_NAMES}

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Model:
    """A loaded, validated artifact. Predictions run on one thread (OpenMP threads spin against
    the rest of the process and other processes); LightGBM's predict is thread-safe."""

    kind: str
    version: str
    path: Path
    feature_names: tuple[str, ...]
    metadata: Mapping[str, Any]
    booster: lgb.Booster

    @property
    def thresholds(self) -> Mapping[str, Mapping[str, float]]:
        """Thresholds proposed at training time, per transaction kind."""
        return dict(self.metadata.get("thresholds", {}))

    def predict(self, rows: Matrix | Sequence[Sequence[float]]) -> npt.NDArray[np.float64]:
        """Probabilities for a batch of rows (n x features), in feature-list order."""
        matrix = self._matrix(rows)
        return np.asarray(self.booster.predict(matrix, num_threads=1), dtype=np.float64)

    def explain(self, row: FeatureRow | ChurnRow | Matrix, top: int = 3) -> tuple[Reason, ...]:
        """The `top` features that pushed this row's score up most (LightGBM SHAP values, in
        log-odds), as reasons; features that lowered the score are not reasons."""
        values = row.array() if isinstance(row, FeatureRow | ChurnRow) else np.asarray(row, np.float64)
        return self.explain_many(values.reshape(1, -1), top)[0]

    def explain_many(self, rows: Matrix, top: int = 3) -> list[tuple[Reason, ...]]:
        matrix = self._matrix(rows)
        contrib = np.asarray(self.booster.predict(matrix, pred_contrib=True, num_threads=1), dtype=np.float64)[:, :-1]
        order = np.argsort(-contrib, axis=1, kind="stable")[:, :top]
        out: list[tuple[Reason, ...]] = []
        for i, picks in enumerate(order.tolist()):
            out.append(tuple(self._reason(j, matrix[i, j], contrib[i, j]) for j in picks if contrib[i, j] > 0))
        return out

    def _reason(self, index: int, value: float, weight: float) -> Reason:
        name = self.feature_names[index]
        shown = "missing" if math.isnan(value) else f"{value:.4g}"
        return Reason(f"model:{name}", f"{name.replace('_', ' ')} = {shown}", round(float(weight), 4))

    def _matrix(self, rows: Matrix | Sequence[Sequence[float]]) -> Matrix:
        matrix = np.asarray(rows, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != len(self.feature_names):
            raise ValueError(f"expected rows of {len(self.feature_names)} features, got shape {matrix.shape}")
        return matrix


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _readable(root: Path) -> Iterator[None]:
    """A path the file system refuses (a name too long, a file the service user may not read)
    is a refused artifact like any other, so start-up falls back and a reload keeps serving."""
    try:
        yield
    except OSError as exc:
        raise ModelUnavailable(f"{root}: cannot read the artifact ({exc.strerror or exc})", field="path") from exc


def _check_structure(text: str, trees: int, features: int) -> None:
    """LightGBM's parser trusts the `tree_sizes` header and can crash the process on a cut or
    spliced file, so the text is checked against it before LightGBM sees it; and its predict
    trusts every tree's node indices (see _check_tree)."""
    sizes_line = next((line for line in text.splitlines() if line.startswith("tree_sizes=")), None)
    start, end = text.find("\nTree=0\n"), text.find("\nend of trees\n")
    if sizes_line is None or start < 0 or end < 0:
        raise ValueError("not a complete LightGBM model (header, trees or end marker missing)")
    try:
        sizes = [int(x) for x in sizes_line.removeprefix("tree_sizes=").split()]
    except ValueError as exc:
        raise ValueError("unreadable tree_sizes header") from exc
    if len(sizes) != trees or sum(sizes) != len(text[start + 1 : end + 1].encode()):
        raise ValueError(f"tree section does not match its header ({len(sizes)} trees, {trees} expected)")
    tail = text[end:]
    if "\nparameters:\n" not in tail or "\nend of parameters\n" not in tail:
        raise ValueError("parameter section is cut short")
    if not text.rstrip().rsplit("\n", 1)[-1].startswith("pandas_categorical:"):
        raise ValueError("model text is cut short")
    header = dict(line.split("=", 1) for line in text[:start].splitlines() if "=" in line)
    if header.get("max_feature_idx") != str(features - 1):
        raise ValueError(f"max_feature_idx is {header.get('max_feature_idx')!r}, expected {features - 1}")
    blocks = [b for b in text[start + 1 : end].split("\n\n") if b.strip()]
    if len(blocks) != trees:
        raise ValueError(f"{len(blocks)} tree blocks, {trees} expected")
    for number, block in enumerate(blocks):
        try:
            _check_tree(block, features)
        except ValueError as exc:
            raise ValueError(f"tree {number}: {exc}") from None


def _check_tree(block: str, features: int) -> None:
    """LightGBM's predict follows split_feature, left_child and right_child without bounds
    checks: a feature index past the row reads other memory, a child out of range or a cycle
    crashes or hangs the process. So every split must name a feature of the row, and the
    children must make one tree from node 0 that reaches every node and leaf exactly once.
    fraud_svc trains neither categorical splits nor linear leaves, so those are refused too, and
    so is a split marked categorical in its decision_type with no categories (explaining a row
    over it crashed the process). Leaf values must be finite and thresholds numbers (LightGBM
    writes an infinite one itself): a NaN leaf scores NaN, which reaches no decision threshold,
    so every row it touched would be allowed."""
    fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)

    def ints(name: str, count: int) -> list[int]:
        values = [int(x) for x in fields.get(name, "").split()]
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} values, {count} expected")
        return values

    leaves = int(fields.get("num_leaves", "0"))
    if leaves < 1:
        raise ValueError("num_leaves must be positive")
    if fields.get("num_cat", "0") != "0" or fields.get("is_linear", "0") != "0":
        raise ValueError("categorical splits and linear leaves are not something fraud_svc trains")
    if len(_numbers(fields, "leaf_value")) != leaves:
        raise ValueError(f"leaf_value does not hold {leaves} leaves")
    if leaves == 1:
        return
    nodes = leaves - 1
    if any(not 0 <= f < features for f in ints("split_feature", nodes)):
        raise ValueError(f"a split names a feature outside 0..{features - 1}")
    # bit 0 categorical, bit 1 default left, bits 2-3 the missing-value kind (none, zero, NaN)
    if any(d & 1 or not 0 <= d < 16 or (d >> 2) & 3 > 2 for d in ints("decision_type", nodes)):
        raise ValueError("a split is categorical or has a decision_type LightGBM does not define")
    if len(_numbers(fields, "threshold", allow_infinite=True)) != nodes:  # LightGBM writes inf itself
        raise ValueError(f"threshold does not hold {nodes} splits")
    left, right = ints("left_child", nodes), ints("right_child", nodes)
    seen_nodes, seen_leaves, todo = {0}, set(), [0]
    while todo:
        node = todo.pop()
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= nodes or child in seen_nodes:
                    raise ValueError(f"node {node} has child node {child}: out of range or reached twice")
                seen_nodes.add(child)
                todo.append(child)
            else:
                leaf = ~child
                if leaf >= leaves or leaf in seen_leaves:
                    raise ValueError(f"node {node} has leaf {leaf}: out of range or reached twice")
                seen_leaves.add(leaf)
    if len(seen_nodes) != nodes or len(seen_leaves) != leaves:
        raise ValueError("some nodes or leaves are not reached from the root")


def _numbers(fields: dict[str, str], name: str, *, allow_infinite: bool = False) -> list[float]:
    values = [float(x) for x in fields.get(name, "").split()]
    if any(math.isnan(v) or (math.isinf(v) and not allow_infinite) for v in values):
        raise ValueError(f"{name} holds a value that is not a {'number' if allow_infinite else 'finite number'}")
    return values


def data_hash(features: Matrix, labels: npt.NDArray[np.generic]) -> str:
    """Identifies the training data: the same rows and labels give the same hash."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(features, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int8).tobytes())
    return digest.hexdigest()


def save_artifact(
    out_dir: Path | str,
    booster: lgb.Booster,
    *,
    kind: str,
    data: Mapping[str, Any],
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Writes a new artifact directory under `out_dir` atomically (rename of a finished temp
    directory) and returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = booster.model_to_string()
    digest = hashlib.sha256(text.encode()).hexdigest()
    now = datetime.now(UTC)
    version = f"{kind}-{now:%Y%m%dT%H%M%S}Z-{digest[:8]}"
    final = out / version
    suffix = 1
    while final.exists():
        suffix += 1
        final = out / f"{version}.{suffix}"
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / MODEL_FILE).write_text(text)
        metadata = {
            "format": ARTIFACT_FORMAT, "kind": kind, "version": final.name, "created_at": now.isoformat(),
            "feature_names": list(EXPECTED_FEATURES[kind]), "model_file": MODEL_FILE, "model_sha256": digest,
            "num_trees": booster.num_trees(),
            "data": dict(data), "params": dict(params), "metrics": dict(metrics), "thresholds": dict(thresholds or {}),
        }  # fmt: skip
        text_meta = json.dumps(_strict_json(metadata), indent=2, sort_keys=True, allow_nan=False)
        (tmp / METADATA_FILE).write_text(text_meta)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _strict_json(value: Any) -> Any:
    """Metadata is read by other tools too: NaN (a metric with no positives) becomes null."""
    if isinstance(value, Mapping):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_artifact(path: Path | str, *, kind: str | None = None) -> Model:
    """Loads and validates an artifact directory; raises ModelUnavailable saying why not."""
    root = Path(path)
    meta_path = root / METADATA_FILE
    with _readable(root):
        if not meta_path.is_file():
            raise ModelUnavailable(f"{root}: no {METADATA_FILE}; not a model artifact", field="path")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"{meta_path}: unreadable metadata ({exc})", field="path") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != ARTIFACT_FORMAT:
        raise ModelUnavailable(f"{meta_path}: unknown artifact format", field="path")
    found_kind = str(metadata.get("kind"))
    if found_kind not in EXPECTED_FEATURES or (kind is not None and found_kind != kind):
        raise ModelUnavailable(f"{root}: artifact is a {found_kind!r} model, expected {kind or 'fraud/churn'}")
    expected = EXPECTED_FEATURES[found_kind]
    names, trees = metadata.get("feature_names"), metadata.get("num_trees")
    if not isinstance(names, list) or not isinstance(trees, int) or isinstance(trees, bool):
        raise ModelUnavailable(f"{meta_path}: feature_names must be a list and num_trees a whole number")
    if tuple(names) != expected:
        raise ModelUnavailable(f"{root}: feature list differs from this code's {len(expected)} {found_kind} features")
    model_file = str(metadata.get("model_file", MODEL_FILE))
    if Path(model_file).name != model_file or model_file in ("", ".", ".."):
        # an artifact is its directory: metadata pointing elsewhere would load what was not checked in
        raise ModelUnavailable(f"{root}: model_file {model_file[:80]!r} is not a file name in the artifact")
    model_path = root / model_file
    with _readable(root):
        if not model_path.is_file():
            raise ModelUnavailable(f"{root}: model file {model_path.name} is missing")
        if _sha256(model_path) != metadata.get("model_sha256"):
            raise ModelUnavailable(f"{model_path}: checksum does not match metadata (truncated or replaced)")
    try:
        text = model_path.read_text()
        _check_structure(text, trees, len(expected))
        objective = next((line for line in text.splitlines() if line.startswith("objective=")), "objective=")
        if objective.removeprefix("objective=").split(" ")[0] != "binary":
            # a regression booster with the right features would load and answer 8.5 on a real row
            raise ValueError(f"the model must be a binary classifier, not {objective!r}")
        booster = lgb.Booster(model_str=text)
        if tuple(booster.feature_name()) != expected:
            raise ValueError("the model's own feature names differ from the metadata")
        probe = np.asarray(booster.predict(np.zeros((1, len(expected)))), dtype=np.float64)
    except (lgb.basic.LightGBMError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelUnavailable(f"{model_path}: model does not load ({exc})") from exc
    if probe.shape != (1,) or not 0.0 <= float(probe[0]) <= 1.0:
        raise ModelUnavailable(f"{model_path}: probe prediction is not a probability")
    version = str(metadata.get("version", root.name))
    return Model(found_kind, version, root, expected, metadata, booster)


def artifacts(models_dir: Path | str, kind: str) -> list[Path]:
    """Artifact directories of `kind`, newest first by name (names sort by creation time); not
    validated — pass them to `load_artifact`."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(f"{kind}-")), reverse=True)


def latest_artifact(models_dir: Path | str, kind: str) -> Path | None:
    found = artifacts(models_dir, kind)
    return found[0] if found else None
