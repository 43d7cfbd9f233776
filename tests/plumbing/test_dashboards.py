"""The Grafana dashboards under dashboards/ only chart metrics the services really export.

Every module that defines a pointmesh metric is imported, so the default registry holds each
family the services serve on /metrics; every panel query must name only those series.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "dashboards").glob("*.json"))
SERVICE_MODULES = ("ledger_svc.app", "rules_svc.app", "fraud_svc.app", "gateway.app", "pointmesh.consumers")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created")}  # fmt: skip


def exported() -> set[str]:
    for module in SERVICE_MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def queries(dashboard: dict[str, object]) -> list[tuple[str, str]]:
    panels = dashboard["panels"]
    assert isinstance(panels, list) and panels
    return [(str(p["title"]), str(t["expr"])) for p in panels for t in p["targets"]]


def test_there_are_dashboards_for_overview_fraud_and_experiments() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"overview", "fraud", "experiments"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_queries_only_exported_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    known = exported()
    for title, expr in queries(dashboard):
        named = set(re.findall(r"\bpointmesh_[a-z0-9_]+", expr))
        assert named, f"panel {title!r} charts no pointmesh metric: {expr}"
        assert named <= known, f"panel {title!r} names unknown metrics {sorted(named - known)}"


def test_a_misspelt_metric_would_be_caught() -> None:
    assert "pointmesh_points_issued_total" in exported()
    assert "pointmesh_points_issue_total" not in exported()
