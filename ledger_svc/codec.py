"""JSON round-trip for the ledger's frozen dataclasses.

Idempotency records keep the original result so a replay returns it byte for byte, and the
outbox keeps events as JSON until the relay turns them into protobuf.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from datetime import datetime, timedelta
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


_SCALARS = (str, int, float, bool, type(None))


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def to_plain(value: Any) -> Any:
    """Dataclasses, enums, datetimes and containers as JSON-ready values (hot path: keep it lean)."""
    if isinstance(value, _SCALARS):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, enum.Enum):
        return value.value
    cls: Any = type(value)
    if hasattr(cls, "__dataclass_fields__"):
        return {name: to_plain(getattr(value, name)) for name in _field_names(cls)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_plain(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return from_plain(inner[0], data)
    if origin is tuple:
        return tuple(from_plain(typing.get_args(tp)[0], v) for v in data)
    if origin is list:
        return [from_plain(typing.get_args(tp)[0], v) for v in data]
    if origin is dict:
        return {k: from_plain(typing.get_args(tp)[1], v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return tp(**{f.name: from_plain(hints[f.name], data[f.name]) for f in dataclasses.fields(tp) if f.name in data})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is datetime:
        return datetime.fromisoformat(data)
    if tp is timedelta:
        return timedelta(microseconds=data)
    return data


def dumps(value: Any) -> str:
    return json.dumps(to_plain(value), separators=(",", ":"), sort_keys=True)


def loads(cls: type[T], text: str) -> T:
    return typing.cast(T, from_plain(cls, json.loads(text)))
