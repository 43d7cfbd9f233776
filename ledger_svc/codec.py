"""JSON round-trip for the ledger's frozen dataclasses.

Idempotency records keep the original result so a replay returns it byte for byte, and the
outbox keeps events as JSON until the relay turns them into protobuf.

Every posting encodes a result, a balance and an event, so this is on the hot path: each
dataclass gets an encoder and a decoder built once from its type hints, instead of
inspecting every value on every call.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import cache
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
Convert = Callable[[Any], Any]

_SCALARS = (str, int, float, bool, type(None))
# Records, results and events: orjson writes them ~5x faster than the json module (the records
# are on every posting's path). For the values records hold (str keys, int64 numbers, text,
# finite floats) it writes the same JSON, save that text outside ASCII is UTF-8 rather than \u
# escapes, and either text reads back to the same value. Unlike the json module it refuses ints
# past 64 bits and writes NaN as null; the ledger's bounds and its fraud client keep both out.
# It does not read the NaN and Infinity the json module wrote: `parse` reads those the old way.
_OPTIONS = orjson.OPT_SORT_KEYS
# Fingerprints hash the text itself, so theirs stays the json module's (escaped) text: a retry
# that crosses an upgrade must hash as it did when it was first recorded.
_canonical = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _dumps(plain: Any) -> str:
    return orjson.dumps(plain, option=_OPTIONS).decode()


def _same(value: Any) -> Any:
    return value


def _optional(inner: Convert) -> Convert:
    if inner is _same:
        return _same
    return lambda value: None if value is None else inner(value)


def to_plain(value: Any) -> Any:
    """Dataclasses, enums, datetimes and containers as JSON-ready values."""
    if isinstance(value, _SCALARS):
        return value.value if isinstance(value, enum.Enum) else value
    cls: Any = type(value)
    if hasattr(cls, "__dataclass_fields__"):
        return _encoder(cls)(value)
    if isinstance(value, enum.Enum):
        return value.value
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
def _encode_as(tp: Any) -> Convert:
    """The encoder for a declared type; `to_plain` for anything it cannot decide up front."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return _optional(_encode_as(members[0])) if len(members) == 1 else to_plain
    if origin in (tuple, list):
        args = typing.get_args(tp)
        item = _encode_as(args[0]) if args else to_plain
        return lambda value: [item(v) for v in value]
    if origin is dict:
        value_of = _encode_as(typing.get_args(tp)[1])
        return lambda value: {k: value_of(v) for k, v in value.items()}
    if tp in (str, int, bool):
        return _same
    if tp is datetime:
        return datetime.isoformat
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda value: value.value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return lambda value: _encoder(tp)(value)
    return to_plain


@cache
def _encoder(cls: type) -> Convert:
    """An encoder written out for the class: one dict display, fields that need no conversion
    read directly. It runs several times per posting, so the generic loop over fields with a
    call per field was a tenth of a batch posting's time."""
    hints = typing.get_type_hints(cls)
    namespace: dict[str, Any] = {}
    items = []
    for i, f in enumerate(dataclasses.fields(cls)):
        if not f.name.isidentifier():
            raise TypeError(f"{cls.__name__}.{f.name} cannot be encoded")
        convert = _encode_as(hints[f.name])
        if convert is _same:
            items.append(f"{f.name!r}: value.{f.name}")
        else:
            namespace[f"c{i}"] = convert
            items.append(f"{f.name!r}: c{i}(value.{f.name})")
    exec(f"def encode(value):\n    return {{{', '.join(items)}}}\n", namespace)
    encode: Convert = namespace["encode"]
    return encode


@cache
def _decode_as(tp: Any) -> Convert:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _optional(_decode_as(args[0]))
    if origin is tuple:
        item = _decode_as(typing.get_args(tp)[0])
        return lambda data: tuple(item(v) for v in data)
    if origin is list:
        item = _decode_as(typing.get_args(tp)[0])
        return lambda data: [item(v) for v in data]
    if origin is dict:
        value_of = _decode_as(typing.get_args(tp)[1])
        return lambda data: {k: value_of(v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return lambda data: _decoder(tp)(data)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if tp is datetime:
        return datetime.fromisoformat
    if tp is timedelta:
        return lambda data: timedelta(microseconds=data)
    return _same


@cache
def _decoder(cls: type) -> Convert:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _decode_as(hints[f.name])) for f in dataclasses.fields(cls)]

    def decode(data: dict[str, Any]) -> Any:
        # A field missing from an older record takes its default.
        return cls(**{name: convert(data[name]) for name, convert in fields if name in data})

    return decode


def from_plain(tp: Any, data: Any) -> Any:
    return _decode_as(tp)(data)


def dumps(value: Any) -> str:
    return _dumps(to_plain(value))


def dumps_plain(plain: Any) -> str:
    """`dumps` for a value already made of JSON types, without walking it again."""
    return _dumps(plain)


def canonical(plain: Any) -> str:
    """Text of a JSON-ready value that never changes across versions, for hashing."""
    return _canonical(plain)


def parse(text: str) -> Any:
    """JSON text as plain values, whichever encoder wrote it."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # NaN or Infinity, written by the json module before orjson


def loads(cls: type[T], text: str) -> T:
    decode: Convert = _decode_as(typing.cast(Any, cls))
    return typing.cast(T, decode(parse(text)))
