"""JSON bodies that name a member twice are refused, not read as their last value.

Parsers disagree on which duplicate counts (RFC 8259 4; I-JSON, RFC 7493, forbids them): a proxy,
a fraud tap or the till's own log that reads the first `points` of `{"points": 1, "points": 100}`
would record 1 point spent while the ledger spends 100. Every route's request parses its JSON
body with a check for repeated members; the 400 names the member (gateway/problems.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DuplicateMember(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"names the member {name!r} more than once in one object")
        self.name = name


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise DuplicateMember(name)
        members[name] = value
    return members


class _StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_unique_members)
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose request parses JSON bodies with `_unique_members` (the request object is
    the one Starlette built, given the stricter `json`: nothing else about it changes)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            request.__class__ = _StrictJsonRequest
            return await handler(request)

        return strict
