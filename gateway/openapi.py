"""The served OpenAPI document: every operation lists the problem+json answers it can give,
with one shared Problem schema, in place of FastAPI's default validation-error shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.problems import MEDIA_TYPE

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


def install(app: FastAPI) -> None:
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
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                for code, text in WHEN.items():
                    responses[code] = {
                        "description": text,
                        "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                    }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
