"""Client stubs for pointmesh services, built on the one channel factory in rpc.py.

Every LedgerService mutation carries an idempotency key and every read is side-effect free,
so all its unary methods may be retried on UNAVAILABLE; streaming calls never are.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from pointmesh.rpc import client_channel
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc, ledger_pb2, ledger_pb2_grpc, rules_pb2, rules_pb2_grpc

Stub = TypeVar("Stub")

# The channel behind each stub made here: a stub does not expose it, and its owner must close it
# (an open channel keeps its connection, its keepalive pings and gRPC's poller for the process).
_CHANNELS: weakref.WeakKeyDictionary[object, grpc.aio.Channel] = weakref.WeakKeyDictionary()


def _stub(make: Callable[[grpc.aio.Channel], Stub], channel: grpc.aio.Channel) -> Stub:
    stub = make(channel)
    _CHANNELS[stub] = channel
    return stub


async def close(stub: object) -> None:
    """Close the channel of a stub made here; calls still in flight on it are cancelled."""
    channel = _CHANNELS.pop(stub, None)
    if channel is not None:
        await channel.close()


@contextlib.asynccontextmanager
async def closing(stub: Stub) -> AsyncIterator[Stub]:
    """For one-shot callers (CLI commands, file imports): the stub's channel closes on the way out."""
    try:
        yield stub
    finally:
        await close(stub)


LEDGER_SERVICE: ServiceDescriptor = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"]


def unary_methods(service: ServiceDescriptor) -> list[str]:
    """Fully qualified names of the service's unary-unary methods."""
    return [
        f"/{service.full_name}/{m.name}" for m in service.methods if not m.client_streaming and not m.server_streaming
    ]


def ledger_stub(target: str, *, default_timeout_seconds: float = 5.0) -> ledger_pb2_grpc.LedgerServiceStub:
    channel = client_channel(
        target, idempotent_methods=unary_methods(LEDGER_SERVICE), default_timeout_seconds=default_timeout_seconds
    )
    return _stub(ledger_pb2_grpc.LedgerServiceStub, channel)


RULES_SERVICE: ServiceDescriptor = rules_pb2.DESCRIPTOR.services_by_name["RulesService"]


def rules_stub(target: str, *, default_timeout_seconds: float = 5.0) -> rules_pb2_grpc.RulesServiceStub:
    """Evaluate and reads are pure and PublishProgram carries an idempotency key: all retryable."""
    channel = client_channel(
        target, idempotent_methods=unary_methods(RULES_SERVICE), default_timeout_seconds=default_timeout_seconds
    )
    return _stub(rules_pb2_grpc.RulesServiceStub, channel)


FRAUD_SERVICE: ServiceDescriptor = fraud_pb2.DESCRIPTOR.services_by_name["FraudService"]


def fraud_stub(target: str, *, default_timeout_seconds: float = 5.0) -> fraud_pb2_grpc.FraudServiceStub:
    """Score counts an event_id once however often it is sent, and the rest are reads: all retryable."""
    channel = client_channel(
        target, idempotent_methods=unary_methods(FRAUD_SERVICE), default_timeout_seconds=default_timeout_seconds
    )
    return _stub(fraud_pb2_grpc.FraudServiceStub, channel)
