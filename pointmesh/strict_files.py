"""YAML and JSON documents people write (loyalty programs, the fraud team's files), read so
that a key given twice in one mapping is refused instead of silently taking the last value.

PyYAML and json both keep the last of two equal keys: a second `effect:` pasted under a rule
made a x2 rule pay x20, and a decision file with `deny: 0.9` twice would serve whichever came
last. Every service reads such files through `load_strict`.

PyYAML also reads numbers by YAML 1.1, where `0100` is octal 64, `1:40` base 60 (100), `1_000`
a thousand and `0x10` sixteen: `per_minor: 0100` earned at 1 point per 64 cents. A number is
therefore refused unless written plainly (`100`, `-3`, `0`), at the path of its field.
"""

from __future__ import annotations

import json
import re
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


class AmbiguousNumber(yaml.MarkedYAMLError):
    """Numbers YAML 1.1 reads other than a person means (octal, base 60, ...): `found` holds
    (path, problem) for each, e.g. ("base_rates[0].per_minor", "0100 is read by YAML as ...").
    A yaml.YAMLError, so a caller that reports bad YAML reports this too; `str()` is one line
    naming the first path and its line and column."""

    def __init__(self, found: list[tuple[str, str]], node: yaml.Node) -> None:
        super().__init__(problem=found[0][1], problem_mark=node.start_mark)
        self.found = found
        self.path = found[0][0]
        self.line = node.start_mark.line + 1
        self.column = node.start_mark.column + 1

    def __str__(self) -> str:
        return f"{self.path or 'the document'}: {self.problem} (line {self.line} column {self.column})"


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_PLAIN_INT = re.compile(r"\A[-+]?(0|[1-9][0-9]*)\Z")


def _misread(node: yaml.ScalarNode) -> str | None:
    """Why a number scalar does not mean what it spells, or None when it does."""
    text = node.value
    if node.tag == _FLOAT_TAG and ":" in text:
        return f"{text} is read by YAML as a base-60 number; quote it ('{text}') if it is text"
    if node.tag != _INT_TAG or _PLAIN_INT.fullmatch(text):
        return None
    sign, digits = text[: len(text) - len(text.lstrip("+-"))], text.lstrip("+-")
    value = yaml.SafeLoader("").construct_yaml_int(node)
    if ":" in digits:
        return (f"{text} is read by YAML as the base-60 number {value}; quote it ('{text}') if it is a time "
                "of day, or write the number plainly")  # fmt: skip
    if "_" in digits:
        return f"{text} is read by YAML as {value}; write numbers without _ separators ({value})"
    if digits[:2].lower() in ("0x", "0b"):
        kind = "hexadecimal" if digits[1] in "xX" else "binary"
        return f"{text} is read by YAML as the {kind} number {value}; write it in decimal ({value})"
    plain = sign + (digits.lstrip("0") or "0")
    return (f"{text} is read by YAML as the octal number {value}, not {plain}; write {plain} without leading "
            f"zeros, or quote it ('{text}') if it is text")  # fmt: skip


def _misread_numbers(root: yaml.Node) -> tuple[list[tuple[str, str]], yaml.Node | None]:
    """Every misread number under `root` with its path (`a.b[2].c`), in document order, and
    the first one's node. A node an alias repeats is looked at once."""
    found: list[tuple[str, str]] = []
    first: yaml.Node | None = None
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            problem = _misread(node)
            if problem is not None:
                found.append((path, problem))
                first = first or node
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(node.value))))
        elif isinstance(node, yaml.MappingNode):
            children: list[tuple[yaml.Node, str]] = []
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                children += [(key_node, path), (value_node, f"{path}.{name}" if path else str(name))]
            stack.extend(reversed(children))
    return found, first


def load_strict(text: str, *, fmt: Literal["yaml", "json"] = "yaml") -> Any:
    """YAML (safe tags only; JSON reads as YAML too) or strict JSON text -> plain Python values.
    DuplicateKey for a repeated key; AmbiguousNumber for a YAML number not written plainly;
    syntax errors propagate as yaml.YAMLError or json.JSONDecodeError, which name their line."""
    if fmt == "json":
        return json.loads(text, object_pairs_hook=_unique_pairs)
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        found, first = _misread_numbers(root)
        if first is not None:
            raise AmbiguousNumber(found, first)
        return loader.construct_document(root)
    finally:
        loader.dispose()
