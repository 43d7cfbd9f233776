"""A JVM that ends before opening its port reports what it wrote during that start."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointmesh.jvm import JvmExited, JvmProcess
from pointmesh.redis_server import free_port


def test_an_exited_jvm_reports_this_starts_log_not_an_earlier_ones(tmp_path: Path) -> None:
    process = JvmProcess("tool", tmp_path)
    process.log_path.write_text("an earlier run: Unable to contact any seeds\n")

    with pytest.raises(JvmExited) as exited:
        process.start(["-cp", str(tmp_path), "NoSuchMainClass"], free_port(), timeout=60)

    assert "NoSuchMainClass" in exited.value.log
    assert "earlier run" not in exited.value.log
    assert "exited with 1" in str(exited.value)
    assert process.running_pid() is None
