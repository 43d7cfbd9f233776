"""The served OpenAPI document: every operation lists the problem+json answers it can give,
with one shared Problem schema, in place of FastAPI's default validation-error shape. An answer
a route documents itself (readiness's 503, a webhook's 422 report) is left as the route says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.problems import MEDIA_TYPE, Problem

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; extra members depend on the type (e.g. available_points).",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "examples": ["https://pointmesh.dev/problems/insufficient-points"]},
        "title": {"type": "string", "examples": ["Not enough points"]},
        "status": {"type": "integer", "examples": [422]},
        "detail": {"type": "string", "examples": ["member m_… has 120 points available, 500 requested"]},
        "instance": {"type": "string", "examples": ["/v1/redemptions"]},
        "errors": {
            "type": "array",
            "items": {
                "type": "object", "required": ["field", "detail"],
                "properties": {"field": {"type": "string", "examples": ["lines[0].quantity"]},
                               "detail": {"type": "string", "examples": ["must be positive, got -1"]}},
            },
        },
    },
    "additionalProperties": True,
}  # fmt: skip

WHEN = {
    "400": "Invalid request: the field at fault is in `errors`",
    "401": "Missing, invalid, revoked or expired credentials",
    "403": "The credential may not do this (scope, channel, store or another member)",
    "404": "Not found",
    "409": "An Idempotency-Key or receipt reused with another body",
    "422": "Not possible now (e.g. insufficient points, member blocked, hold expired)",
    "503": "A service is unavailable; retry after Retry-After seconds",
    "500": "Unexpected error (logged; no details leak)",
}


def problem_response(text: str) -> dict[str, Any]:
    return {"description": text, "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


# For the routers whose routes call a service (app.py includes them with it): a gRPC answer of
# RESOURCE_EXHAUSTED (a service's limit, or a message over gRPC's) is a 429.
CALLS_A_SERVICE: dict[int | str, dict[str, Any]] = {
    429: problem_response("A service refused the request for its limits (gRPC RESOURCE_EXHAUSTED); retry later")
}


def _fastapis_validation_error(response: dict[str, Any]) -> bool:
    """The 422 FastAPI adds for its own validation shape: the gateway answers those with a 400."""
    return "HTTPValidationError" in str(response.get("content", ""))


def install(app: FastAPI, body_limit: Callable[[str], tuple[int, Problem]]) -> None:
    """`body_limit`: what a path's body may carry and how a larger one is refused (app.body_limit)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (pmk_…) or a member token"}
        }
        doc["security"] = [{"bearer": []}]
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for path, item in doc.get("paths", {}).items():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                for code, text in WHEN.items():
                    if code not in responses or _fastapis_validation_error(responses[code]):
                        responses[code] = problem_response(text)
                for parameter in operation.get("parameters", []):
                    # Optional to FastAPI so that its absence is refused by `writing` (naming the
                    # header, after the scope check), but no write runs without it.
                    if parameter.get("in") == "header" and parameter.get("name", "").lower() == "idempotency-key":
                        parameter["required"] = True
                limit, refusal = body_limit(path)
                if refusal.status == 413:  # any method: a GET sent with a large body is refused too
                    responses["413"] = problem_response(f"The body is larger than {limit} bytes")
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
