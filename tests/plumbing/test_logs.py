"""Structured log lines: one JSON object per line, carrying the active trace and caller fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from pointmesh.logs import configure_logging
from pointmesh.telemetry import setup_telemetry, tracer


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_line_carries_trace_ids_and_extra_fields(
    restore_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_telemetry("plumbing-tests", None)
    configure_logging("ledger", "DEBUG", "json")
    configure_logging("ledger", "DEBUG", "json")
    with tracer("tests").start_as_current_span("earn") as span:
        logging.getLogger("ledger_svc.service").info("earned %d", 40, extra={"account_id": "a-1"})
    logging.getLogger("ledger_svc.service").debug("outside any span")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, "configuring twice must not duplicate handlers"
    inside, outside = (json.loads(line) for line in lines)
    context = span.get_span_context()
    assert inside["msg"] == "earned 40"
    assert inside["level"] == "INFO"
    assert inside["service"] == "ledger"
    assert inside["logger"] == "ledger_svc.service"
    assert inside["account_id"] == "a-1"
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert inside["ts"].endswith("Z")
    assert "trace_id" not in outside


def test_text_format_is_one_human_line(restore_root_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("rules", "INFO", "text")
    logging.getLogger("rules_svc").info("loaded %s", "spring-2026", extra={"rules": 12})
    logging.getLogger("rules_svc").debug("hidden below INFO")
    (line,) = capsys.readouterr().err.splitlines()
    assert "INFO" in line and "rules/rules_svc:" in line and "loaded spring-2026" in line and "rules=12" in line


def test_unknown_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("x", "INFO", "xml")
    with pytest.raises(ValueError, match="level"):
        configure_logging("x", "LOUD", "json")
