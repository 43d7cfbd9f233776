"""What every route needs: the gateway's clients, the caller, a route's scope, a POST's Idempotency-Key,
and one wrapper that turns a failed gRPC call into the right problem."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, TypeVar

import grpc
from fastapi import Depends, Header, Path, Query, Request

from gateway import schemas as s
from gateway.auth import MemberTokens, Principal, credential_of, resolve
from gateway.keys import ApiKey, KeyStore
from gateway.live import LiveHub
from gateway.problems import Problem, bad_request, from_grpc
from pointmesh.clock import Clock
from pointmesh.config import Settings
from pointmesh.v1 import common_pb2, ledger_pb2_grpc, rules_pb2_grpc

T = TypeVar("T")
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass
class Gateway:
    settings: Settings
    ledger: ledger_pb2_grpc.LedgerServiceStub
    rules: rules_pb2_grpc.RulesServiceStub
    keys: KeyStore
    tokens: MemberTokens
    hub: LiveHub
    clock: Clock


# Dependencies are `async def` even with nothing to await: FastAPI runs a plain `def`
# dependency in its thread pool, two thread hand-offs per request on the purchase path.


def _gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def gateway(request: Request) -> Gateway:
    return _gateway_of(request)


async def principal(request: Request) -> Principal:
    gw = _gateway_of(request)
    return await resolve(credential_of(request.headers), gw.keys, gw.tokens)


class Write(NamedTuple):
    """What a POST acts with: the caller's API key (its scope checked) and the request's
    Idempotency-Key, in the namespace of that key."""

    api_key: ApiKey
    key: common_pb2.IdempotencyKey


# Every route checks its scope with one of these dependencies (or `reads_member` below), never in
# its body: FastAPI solves dependencies before it validates the path, query, headers and body, so
# a caller that may not do this hears 403 whatever it sent, not 400 for a field it got wrong.


def scoped(scope: str) -> Any:
    """The dependency of a route that needs an API key with `scope`; it gives that key."""

    async def scope_checked(caller: Annotated[Principal, Depends(principal)]) -> ApiKey:
        return caller.require(scope)

    return Depends(scope_checked)


def scoped_or_member(scope: str) -> Any:
    """The dependency of a route an API key with `scope` may use, or a member token for its own
    member (which member the request names is the route's to check); it gives the caller."""

    async def scope_checked(caller: Annotated[Principal, Depends(principal)]) -> Principal:
        if caller.key is not None:
            caller.require(scope)
        return caller

    return Depends(scope_checked)


def writing(scope: str) -> Any:
    """The dependency of a POST that needs `scope` and an Idempotency-Key. The scope is checked
    first, so a caller that may not do this hears 403 whatever headers it sent, not 400 for a
    missing key."""

    # A default, not in Annotated: FastAPI reads annotations in the module's namespace, without `scope`.
    key_of_scope = scoped(scope)

    async def write(
        caller: Annotated[Principal, Depends(principal)],
        idempotency_key: Annotated[
            str | None,
            Header(description="Required on every POST: retries with the same key and body get the original answer."),
        ] = None,
        api_key: ApiKey = key_of_scope,
    ) -> Write:
        if idempotency_key is None:
            raise bad_request("Idempotency-Key", "the header is required on every POST")
        if not _KEY_RE.match(idempotency_key):
            raise bad_request("Idempotency-Key", "must be 1..128 printable ASCII characters")
        return Write(api_key, common_pb2.IdempotencyKey(namespace=caller.namespace, key=idempotency_key))

    return Depends(write)


async def call(service: str, pending: Awaitable[T], rest_name: Callable[[str], str] | None = None) -> T:
    try:
        return await pending
    except grpc.aio.AioRpcError as error:
        raise from_grpc(error, service, rest_name) from None


GatewayDep = Annotated[Gateway, Depends(gateway)]
# Ids in paths are bounded like ids in bodies (schemas.Id), before any call quotes them back.
IdPath = Annotated[str, Path(max_length=s.MAX_ID_LENGTH)]
UnitQuery = Annotated[str, Query(max_length=64, description="Empty: the default unit (points).")]
PageToken = Annotated[str, Query(max_length=s.MAX_PAGE_TOKEN_LENGTH)]
Caller = Annotated[Principal, Depends(principal)]


async def _reading_member(
    caller: Annotated[Principal, scoped_or_member("members:read")], member_id: Annotated[str, Path()]
) -> Principal:
    # Only compared here: the route bounds it (IdPath), and one bad id is one error, not two.
    caller.may_read_member(member_id)
    return caller


# The dependency of a route that reads the member in its path: an API key with members:read (a
# key without it is refused before the path is validated), or that member's own token.
reads_member = Depends(_reading_member)
__all__ = [
    "Caller", "Gateway", "GatewayDep", "IdPath", "PageToken", "Problem", "UnitQuery", "Write", "call",
    "reads_member", "scoped", "scoped_or_member", "writing",
]  # fmt: skip
