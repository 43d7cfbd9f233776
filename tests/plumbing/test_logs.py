"""Structured log lines: one JSON object per line, carrying the active trace and caller fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from pointmesh.config import load_settings
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
    # Only this logger's lines: a thread an earlier test left may log in between.
    lines = [line for line in capsys.readouterr().err.splitlines() if '"logger": "ledger_svc.service"' in line]
    assert len(lines) == 2, f"configuring twice must not duplicate handlers: {lines}"
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
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "rules/rules_svc:" in line]
    assert "INFO" in line and "rules/rules_svc:" in line and "loaded spring-2026" in line and "rules=12" in line


def test_unknown_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("x", "INFO", "xml")
    with pytest.raises(ValueError, match="level"):
        configure_logging("x", "LOUD", "json")


def test_the_gateways_unhandled_error_line_carries_the_requests_trace_id(
    restore_root_logger: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The error most worth following to its trace: the 500's log line is written while the
    request's span is current (the catch-all handler runs outside it)."""
    setup_telemetry("plumbing-tests", None)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = load_settings({}, data_dir=tmp_path, member_token_secret="x" * 40, redis_url="redis://127.0.0.1:1/0")
    app = create_app(settings)

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    configure_logging("gateway", "INFO", "json")
    answered = TestClient(app, raise_server_exceptions=False).get("/v1/boom")

    assert answered.status_code == 500
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    crashes = [line for line in lines if line["msg"].startswith("unhandled error")]
    [span] = [s for s in exporter.get_finished_spans() if s.name == "GET /v1/boom"]
    assert [c.get("trace_id") for c in crashes] == [f"{span.context.trace_id:032x}"]
