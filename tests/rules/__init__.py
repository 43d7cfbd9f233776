"""Unit tests of the points engine, program validation and member-state guards (no servers).

`program_doc()` builds the smallest valid program mapping (EUR, 1 point per euro, a Helsinki and
a Lisbon store); a test adds its rules, then `compile_doc()` goes through the YAML text and the
validator like a published file would.
"""

from __future__ import annotations

from typing import Any

import yaml

from rules_svc.engine import CompiledProgram
from rules_svc.program import Program, load_program


def program_doc(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "program": "test",
        "default_timezone": "Europe/Helsinki",
        "units": ["points"],
        "channels": ["pos", "app"],
        "stores": [
            {"id": "HEL-01", "region": "FI", "timezone": "Europe/Helsinki"},
            {"id": "LIS-01", "region": "PT", "timezone": "Europe/Lisbon"},
        ],
        "base_rates": [{"currency": "EUR", "unit": "points", "points": 1, "per_minor": 100}],
        "rules": list(rules),
    }
    doc.update(top)
    return doc


def load_doc(doc: dict[str, Any]) -> Program:
    return load_program(yaml.safe_dump(doc, sort_keys=False))


def compile_doc(doc: dict[str, Any]) -> CompiledProgram:
    return CompiledProgram(load_doc(doc), 1)
