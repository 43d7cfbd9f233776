"""`pointmesh fraud|churn train` refuses bad arguments with a message, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import pointmesh_cli


@pytest.mark.parametrize("model", ["fraud", "churn"])
def test_training_refuses_a_negative_seed_naming_it(model: str, tmp_path: Path) -> None:
    rows = "4000" if model == "fraud" else "2000"
    done = pointmesh_cli(model, "train", "--rows", rows, "--seed", "-1", "--out", str(tmp_path / "models"),
                         env={"POINTMESH_DATA_DIR": str(tmp_path)}, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "--seed" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-600:]


@pytest.mark.parametrize("model", ["fraud", "churn"])
def test_training_into_an_out_that_is_a_file_says_so(model: str, tmp_path: Path) -> None:
    rows = "4000" if model == "fraud" else "2000"
    out = tmp_path / "models"
    out.write_text("not a directory")
    done = pointmesh_cli(model, "train", "--rows", rows, "--out", str(out),
                         env={"POINTMESH_DATA_DIR": str(tmp_path)}, timeout=300)  # fmt: skip
    assert done.returncode != 0 and str(out) in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-600:]
