"""YAML and JSON documents people write (loyalty programs, the fraud team's files), read so
that a key given twice in one mapping is refused instead of silently taking the last value.

PyYAML and json both keep the last of two equal keys: a second `effect:` pasted under a rule
made a x2 rule pay x20, and a decision file with `deny: 0.9` twice would serve whichever came
last. Every service reads such files through `load_strict`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml


class DuplicateKey(ValueError):
    """A key repeated in one mapping: `key` as written, and where its second occurrence starts
    (1-based line and column; None for JSON, whose parser does not say where an object is)."""

    def __init__(self, problem: str, key: object, line: int | None = None, column: int | None = None) -> None:
        where = f" at line {line} column {column}" if line is not None else ""
        super().__init__(f"{problem}{where}")
        self.problem = problem
        self.key = key
        self.line = line
        self.column = column


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: refuses a key a JSON object repeats."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"key {key!r} appears twice in one object", key)
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key repeated in one mapping (YAML requires keys to be unique;
    PyYAML keeps the last). A key a merge (`<<`) brings in may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        merges = 0
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges += 1
                if merges > 1:  # two `<<:` keys: one would silently win (a list merges both)
                    raise _duplicate("key '<<' appears twice in one mapping; merge a list: <<: [*a, *b]", "<<",
                                     key_node)  # fmt: skip
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the constructor refuses it below
                continue
            if repeated:
                raise _duplicate(f"key {key!r} appears twice in one mapping", key, key_node)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _duplicate(problem: str, key: object, node: yaml.Node) -> DuplicateKey:
    mark = node.start_mark
    return DuplicateKey(problem, key, mark.line + 1, mark.column + 1)


def load_strict(text: str, *, fmt: Literal["yaml", "json"] = "yaml") -> Any:
    """YAML (safe tags only; JSON reads as YAML too) or strict JSON text -> plain Python values.
    DuplicateKey for a repeated key; syntax errors propagate as yaml.YAMLError or
    json.JSONDecodeError, which name their line."""
    if fmt == "json":
        return json.loads(text, object_pairs_hook=_unique_pairs)
    return yaml.load(text, _UniqueKeyLoader)
