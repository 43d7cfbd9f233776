"""Rich gRPC error statuses: a code, a message, and google.rpc details a client can read.

Every service reports errors the same way: ErrorInfo (reason, domain, metadata incl. the
field), BadRequest with the field violation when a field is at fault, plus any typed detail
such as InsufficientPoints. The gateway turns the same details into problem+json.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

# rules_svc's basket fields as the purchase fields they come from, for the services that send a
# purchase's basket on (the ledger's RecordPurchase, the gateway's explain): "basket" is the
# points it would earn, which follow from the total.
_PURCHASE_FIELDS = {"total_minor": "total.amount_minor", "currency": "total.currency", "basket": "total"}
_ITEM_PREFIX = re.compile(r"^items\[\d+\]\.")


def purchase_field(rules_field: str) -> str:
    """The purchase field a rules_svc refusal of its basket names (`basket.total_minor` ->
    `total.amount_minor`; an EvaluateBatch item's prefix dropped)."""
    name = _ITEM_PREFIX.sub("", rules_field).removeprefix("basket.")
    return _PURCHASE_FIELDS.get(name, name)


# A status travels in the trailers (grpc-message, and grpc-status-details-bin in base64), which
# a client refuses past 8 KiB (some of the time; always past 16 KiB): the call then arrives as
# RESOURCE_EXHAUSTED with none of its fields. A program with hundreds of problems, or a long
# value quoted back, must still arrive as itself.
MAX_MESSAGE_BYTES = 700
MAX_FIELD_BYTES = 200
MAX_DESCRIPTION_BYTES = 300
MAX_VIOLATION_BYTES = 2_500


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` bytes of UTF-8, an ellipsis where it was cut."""
    if len(text.encode()) <= limit:
        return text
    return text.encode()[: limit - 3].decode(errors="ignore") + "…"


def _fitting(violations: Sequence[tuple[str, str]]) -> list[error_details_pb2.BadRequest.FieldViolation]:
    out: list[error_details_pb2.BadRequest.FieldViolation] = []
    used = 0
    for i, (f, text) in enumerate(violations):
        f, text = _cut(f, MAX_FIELD_BYTES), _cut(text, MAX_DESCRIPTION_BYTES)
        used += len(f.encode()) + len(text.encode())
        if used > MAX_VIOLATION_BYTES:
            more = len(violations) - i
            out.append(error_details_pb2.BadRequest.FieldViolation(field="", description=f"and {more} more"))
            break
        out.append(error_details_pb2.BadRequest.FieldViolation(field=f, description=text))
    return out


def rich_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    domain: str,
    field: str = "",
    metadata: Mapping[str, str] | None = None,
    details: Sequence[Message] = (),
    violations: Sequence[tuple[str, str]] = (),
) -> grpc.Status:
    """`violations` lists every (field, description) when a request has several bad fields;
    the status keeps those that fit in MAX_VIOLATION_BYTES, and a last one says how many more."""
    message = _cut(message, MAX_MESSAGE_BYTES)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata or {}))
    if field:
        info.metadata["field"] = _cut(field, MAX_FIELD_BYTES)
    packed: list[Message] = [info]
    if field and not violations:
        violations = [(field, message)]
    if violations:
        packed.append(error_details_pb2.BadRequest(field_violations=_fitting(violations)))
    packed.extend(details)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in packed:
        holder = any_pb2.Any()
        holder.Pack(detail)
        status.details.append(holder)
    return rpc_status.to_status(status)


def status_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[Message]:
    """Unpacks the google.rpc details of a failed call (ErrorInfo, BadRequest, typed ones).

    Empty when they cannot be read (trailers over the metadata limit arrive as RESOURCE_EXHAUSTED
    beside details of another code; bytes that do not parse): the call's code and message are
    still there, and they are what callers map, so unreadable details never become a crash."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, DecodeError):
        return []
    if status is None:
        return []
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    out: list[Message] = []
    for holder in status.details:
        name = holder.TypeName()
        try:
            cls = db.GetSymbol(name)
        except KeyError:
            continue
        msg = cls()
        holder.Unpack(msg)
        out.append(msg)
    return out


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def error_reason(error: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (the callee's own code, e.g. MEMBER_NOT_ACTIVE,
    finer than the gRPC status); '' when it sent none."""
    return next((d.reason for d in status_details(error) if isinstance(d, error_details_pb2.ErrorInfo)), "")


def translating(
    error_type: type[Exception] | tuple[type[Exception], ...], to_status: Callable[[Any], grpc.Status]
) -> Callable[[Handler[Req, Resp]], Callable[..., Awaitable[Resp]]]:
    """A servicer-method decorator turning a service's domain error (or errors) into a rich status."""

    def decorate(method: Handler[Req, Resp]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            try:
                return await method(self, request, context)
            except error_type as error:
                await context.abort_with_status(to_status(error))
                raise  # unreachable: abort raises

        return wrapper

    return decorate
