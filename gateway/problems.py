"""RFC 9457 problem+json for every error the gateway returns, and the one table from gRPC
status codes to HTTP statuses. A client always gets a type, a title, a detail and, for bad
input, the field at fault; never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from starlette.exceptions import HTTPException as StarletteHTTPException

from pointmesh.errors import status_details
from pointmesh.v1 import common_pb2

log = logging.getLogger(__name__)
TYPE_BASE = "https://pointmesh.dev/problems/"
# RFC 3986 characters a path keeps as they are (pchar and "/"); anything else is percent-encoded.
URI_PATH_SAFE = "/:@!$&'()*+,;=-._~"
MEDIA_TYPE = "application/problem+json"

# gRPC code -> (HTTP status, problem type slug)
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid-request"),
    grpc.StatusCode.NOT_FOUND: (404, "not-found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "idempotency-conflict"),
    grpc.StatusCode.FAILED_PRECONDITION: (422, "not-possible-now"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "too-many-requests"),
    grpc.StatusCode.UNAVAILABLE: (503, "service-unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "service-unavailable"),
}
# One title per problem type (RFC 9457 3.1.3: it does not change from occurrence to
# occurrence); a 422 whose type the ledger's ErrorInfo reason names takes its status's.
TITLES: dict[str, str] = {
    "invalid-request": "The request is invalid",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "idempotency-conflict": "Conflict with an earlier request",
    "not-possible-now": "The request cannot be carried out",
    "insufficient-points": "Not enough points",
    "forbidden": "Forbidden",
    "unauthenticated": "Authentication required",
    "too-many-requests": "Too many requests",
    "service-unavailable": "A service is unavailable",
    "request-too-large": "The request body is too large",
    "internal": "Internal error",
}
STATUS_TITLES: dict[int, str] = {422: TITLES["not-possible-now"]}


def title_of(slug: str, status: int) -> str:
    return TITLES.get(slug) or STATUS_TITLES.get(status, "The request could not be served")


class Problem(Exception):
    def __init__(
        self, status: int, slug: str, detail: str, *, errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None, **extra: Any,
    ) -> None:  # fmt: skip
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title_of(slug, status), detail
        self.errors = errors or []
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str) -> dict[str, Any]:
        """`instance`: the request's path, decoded; sent percent-encoded again, since RFC 9457
        makes it a URI reference (a path id with a space or a quote would not be one)."""
        out: dict[str, Any] = {
            "type": TYPE_BASE + self.slug, "title": self.title, "status": self.status, "detail": self.detail,
            "instance": quote(instance, safe=URI_PATH_SAFE),
        }  # fmt: skip
        if self.errors:
            out["errors"] = self.errors
        out.update(self.extra)
        return out


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthenticated", detail, headers={"WWW-Authenticate": "Bearer"})


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", detail)


def bad_request(field: str, detail: str) -> Problem:
    return Problem(400, "invalid-request", f"{field}: {detail}",
                   errors=[{"field": field, "detail": detail}])  # fmt: skip


def unavailable(name: str, *, late: bool = False) -> Problem:
    """A 503 naming the service only (`name`, e.g. "the points ledger"): what the call said,
    peer addresses included, is for the log."""
    detail = f"{name} {'did not answer in time' if late else 'is unavailable'}; retry shortly"
    return Problem(503, "service-unavailable", detail, headers={"Retry-After": "1"})


def too_large(limit: int) -> Problem:
    """Said without closing the connection: a client still sending would meet a reset before it
    read the 413. The server (uvicorn) drops the rest of the body as it arrives, holding none."""
    return Problem(413, "request-too-large", f"body: larger than {limit} bytes",
                   errors=[{"field": "body", "detail": f"larger than {limit} bytes"}])  # fmt: skip


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is read (gateway/app.py bounded_body): FastAPI passes an
    HTTPException on from its body parsing where it turns any other error into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"larger than {limit} bytes")
        self.limit = limit


def unparseable(exc: StarletteHTTPException) -> Problem:
    """FastAPI's "There was an error parsing the body" (or Starlette's for a form), with the
    parser's own reason: JSON that is not UTF-8, nested too deeply, a number too long to
    convert... is the cause FastAPI chains."""
    cause = exc.__cause__
    if isinstance(cause, ValueError | RecursionError):
        return bad_request("body", f"not valid JSON: {cause}")
    return bad_request("body", str(exc.detail))


# Where a service's field path is not what a REST client sent: the Idempotency-Key header, and
# query parameters the gateway packs into a request's sub-message.
REST_FIELDS = {
    "idempotency_key": "Idempotency-Key",
    "idempotency_key.key": "Idempotency-Key",
    "page.page_token": "page_token",
    "page.page_size": "page_size",
    "timeout": "timeout_seconds",
    "member.tier": "tier",  # POST /v1/program/explain prices as a tier
    "external_id.kind": "kind",  # GET /v1/members/lookup?kind=&value=
    "external_id.value": "value",
    "points_available": "member_id",  # a redemption quote: the member's balance fell short
    "external_id": "value",  # the lookup found no member with it
}
# What a 503 says, by the name routes give `call`: the service's own words name its peers'
# addresses and gRPC internals, so they are logged, not returned.
SERVICE_NAMES = {"ledger_svc": "the points ledger", "rules_svc": "the rules engine"}
# The ledger's namespace of a receipt's natural key (ledger_svc/accrual.py natural_key): a
# conflict there is a receipt recorded with another body, not a reused Idempotency-Key.
RECEIPT_NAMESPACE = "purchase:"
SAME_BODY = "An Idempotency-Key (or a receipt) can only be reused with the same request body."


def _violation(field: str, description: str, rest_name: Callable[[str], str] | None) -> dict[str, str]:
    """A field violation by the REST name (the route's own naming first, when it has one), its
    text without the service's "field: " in front."""
    name = rest_name(field) if rest_name is not None else field
    return {"field": REST_FIELDS.get(name, name), "detail": description.removeprefix(f"{field}: ")}


def _conflict(conflict: common_pb2.IdempotencyConflict) -> tuple[str, str]:
    """The field and the sentence of a 409, without the namespace the ledger keeps keys in."""
    if conflict.namespace.startswith(RECEIPT_NAMESPACE):
        return "receipt_id", "the receipt (channel, store, receipt id) was already recorded with a different body"
    return "Idempotency-Key", f"{conflict.key!r} was already used for a different {conflict.original_operation} request"


def from_grpc(error: grpc.aio.AioRpcError, service: str, rest_name: Callable[[str], str] | None = None) -> Problem:
    """`rest_name`: how the route names the service's fields, where the global REST_FIELDS do not
    (explain sends the body as rules_svc's basket)."""
    code = error.code()
    status, slug = GRPC_TO_HTTP.get(code, (500, "internal"))
    details = status_details(error)
    violations = [v for d in details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations]
    errors = [_violation(v.field, v.description, rest_name) for v in violations]
    extra: dict[str, Any] = {}
    detail = error.details() or title_of(slug, status)
    if violations and detail.startswith(f"{violations[0].field}: "):
        detail = f"{errors[0]['field']}: {detail.removeprefix(f'{violations[0].field}: ')}"
    for d in details:
        if isinstance(d, error_details_pb2.ErrorInfo) and d.reason and status == 422:
            slug = d.reason.lower().replace("_", "-")
        if isinstance(d, common_pb2.InsufficientPoints):
            slug = "insufficient-points"
            extra.update(available_points=d.available_points, requested_points=d.requested_points, unit=d.unit)
        if isinstance(d, common_pb2.IdempotencyConflict):
            extra.update(original_operation=d.original_operation, first_seen_at=d.first_seen_at.ToJsonString())
            if not errors or errors[0]["field"] == "Idempotency-Key":  # else the ledger named the field at odds
                field, said = _conflict(d)
                errors, detail = [{"field": field, "detail": said}], f"{field}: {said}"
    # The ledger passes on a peer's outage naming it (ErrorInfo metadata "service"): a tier read
    # with rules_svc down is the rules engine's 503, not the ledger's.
    peer = next((d.metadata.get("service", "") for d in details if isinstance(d, error_details_pb2.ErrorInfo)), "")
    name = SERVICE_NAMES.get(peer or service, peer or service)
    if status == 503:
        log.warning("%s is unavailable (%s): %s", service, code.name, error.details())
        return unavailable(name, late=code == grpc.StatusCode.DEADLINE_EXCEEDED)
    if status == 500:
        log.error("%s failed with %s: %s", service, code.name, detail)
        detail = f"{service} failed; the error is logged"
    if status == 409:
        detail = f"{detail}. {SAME_BODY}"
    return Problem(status, slug, detail, errors=errors, **extra)


def _response(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status, headers=problem.headers,
                        media_type=MEDIA_TYPE)  # fmt: skip


def _field_of(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(error: Mapping[str, Any]) -> str:
    """A validator's own sentence, without pydantic's "Value error, " in front of it."""
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if error.get("type") == "value_error" and cause is not None else str(error["msg"])


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return _response(exc, request)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _grpc(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        return _response(from_grpc(exc, "a backend service"), request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if exc.errors() and exc.errors()[0].get("type") == "json_invalid":  # FastAPI's JSONDecodeError
            error = exc.errors()[0]
            position = error["loc"][1] if len(error["loc"]) > 1 else 0
            reason = (error.get("ctx") or {}).get("error") or error["msg"]
            return _response(bad_request("body", f"not valid JSON: {reason} at character {position}"), request)
        errors = [{"field": _field_of(tuple(e["loc"])), "detail": _message(e)} for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "detail": "invalid"}
        problem = Problem(400, "invalid-request", f"{first['field']}: {first['detail']}",
                          errors=errors)  # fmt: skip
        return _response(problem, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return _response(too_large(exc.limit), request)
        if exc.status_code == 400:  # only FastAPI and Starlette raise it, for a body they cannot parse
            return _response(unparseable(exc), request)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        headers = dict(exc.headers or {})  # a 405's Allow
        return _response(Problem(exc.status_code, slug, str(exc.detail), headers=headers), request)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # Logged (with its trace id) by the instrumentation middleware it passed through.
        return _response(Problem(500, "internal", "an unexpected error; it is logged"), request)
