"""Legacy feeds over HTTP: a file upload for franchise drops and mainframe exports (API key
with `legacy:write`), and signed vendor webhooks (HMAC, no API key). Both become the same
purchase/return commands as every other channel, deduped by the receipt's natural key."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import replace
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from gateway import schemas as s
from gateway.deps import GatewayDep, scoped
from gateway.keys import ApiKey
from gateway.legacy.importer import ADAPTERS, ImportInterrupted, ImportReport, import_records, write_quarantine
from gateway.legacy.records import LegacyPurchase, LegacyReturn, Quarantined
from gateway.legacy.webhook import SignatureError, WebhookAdapter, verify_signature
from gateway.problems import SERVICE_NAMES, Problem, bad_request, unauthorized, unavailable
from gateway.strict_json import StrictJsonRoute
from pointmesh.config import DEV_WEBHOOK_SECRET

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _warn_of_dev_secret(app: FastAPI) -> AsyncIterator[None]:
    """Said at start, loudly: with the published default anyone can sign a webhook that earns."""
    if app.state.gateway.settings.webhook_secret == DEV_WEBHOOK_SECRET:
        log.warning(
            "POINTMESH_WEBHOOK_SECRET is not set: vendor webhooks are verified with the published "
            "development secret, so anyone can sign one. Set it everywhere but on a laptop."
        )
    yield


router = APIRouter(prefix="/v1/legacy", tags=["legacy"], lifespan=_warn_of_dev_secret, route_class=StrictJsonRoute)
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_WEBHOOK_BYTES = 256 * 1024
MAX_LISTED = s.ImportReport.MAX_LISTED  # quarantined lines a report lists; it counts them all
Parsed = LegacyPurchase | LegacyReturn | Quarantined


def _safe_name(source: str) -> str:
    """A file name any uploader may choose becomes a safe, bounded one (plus a digest, so two
    names that clean up alike stay apart)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", source)[:80].lstrip(".") or "upload"
    return f"{cleaned}-{hashlib.sha256(source.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def report_body(report: ImportReport) -> dict[str, Any]:
    """The first MAX_LISTED quarantined lines and the count of all: the answer, and FastAPI's
    check of it on the event loop, stay small however much of the file was quarantined."""
    listed = report.quarantined[:MAX_LISTED]
    return {
        "adapter": report.adapter, "channel": report.channel, "accepted": report.accepted,
        "duplicates": report.duplicates, "pending_accrual": report.pending_accrual,
        "quarantined": [{"source": q.source, "line": q.line, "reason": q.reason, "field": q.field} for q in listed],
        "quarantined_total": len(report.quarantined),
        "quarantined_truncated": len(report.quarantined) > MAX_LISTED,
        # Its name in the gateway's quarantine directory: where the server keeps files is not the caller's.
        "quarantine_file": report.quarantine_file.name if report.quarantine_file else None,
    }  # fmt: skip


def _within_stores(records: Iterable[Parsed], stores: tuple[str, ...]) -> Iterator[Parsed]:
    """A key bound to stores imports only their receipts; the rest are quarantined, not dropped."""
    for record in records:
        store = getattr(record, "store_id", "")
        if stores and not isinstance(record, Quarantined) and store not in stores:
            for line in record.origin.lines:
                yield Quarantined(record.origin.source, line.number, f"store {store} is not one this API key may act for",
                                  line.raw, code="PERMISSION_DENIED", field="store_id")  # fmt: skip
            continue
        yield record


async def _run(gw: Any, records: Iterable[Parsed], adapter: str, channel: str, source: str) -> ImportReport:
    try:
        # A caller is waiting: an unavailable ledger is its 503 now, not after resends.
        report = await import_records(records, gw.ledger, adapter=adapter, channel=channel, resend_delays=())
    except ImportInterrupted as exc:
        # What the ledger said (its peer address included) is for the log, not the caller.
        if not exc.retryable:
            log.error("%s: %s", source, exc)
            raise Problem(500, "internal", "the import stopped: the points ledger failed; "
                          "the error is logged") from None  # fmt: skip
        log.warning("%s: %s", source, exc)
        late = exc.code == grpc.StatusCode.DEADLINE_EXCEEDED
        raise unavailable(SERVICE_NAMES["ledger_svc"], late=late) from None
    if report.quarantined:
        path = gw.settings.data_dir / "quarantine" / f"{_safe_name(source)}.quarantine.jsonl"
        # Every line as JSON, then an fsync: seconds for a big file, which the loop must not wait out.
        await asyncio.to_thread(write_quarantine, report.quarantined, path, adapter=adapter)
        report = replace(report, quarantine_file=path)
    return report


# The upload's body is not a parameter: FastAPI reads a form parameter (here up to 50 MiB, to
# disk) before it runs any dependency, so before the key's scope is known. The route reads it
# after, and documents it here.
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream",
                            "description": "The CSV drop or fixed-width export"}},
}}}}}  # fmt: skip


@router.post("/imports", response_model=s.ImportReport, openapi_extra=_UPLOAD_BODY,
             summary="Import a legacy file (CSV drop or fixed-width export)")  # fmt: skip
async def import_upload(
    request: Request, gw: GatewayDep, key: Annotated[ApiKey, scoped("legacy:write")],
    adapter: Annotated[str, Query(description="csv or fixed-width", examples=["csv"])] = "csv",
) -> dict[str, Any]:  # fmt: skip
    parser = ADAPTERS.get(adapter)
    if parser is None or adapter == "webhook":
        raise bad_request("query.adapter", f"must be one of csv, fixed-width; got {adapter!r}")
    async with request.form() as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise bad_request("body.file", "a file is required (multipart/form-data, field file)")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        source = file.filename or "upload"
    if len(data) > MAX_UPLOAD_BYTES:
        raise bad_request("body.file", f"larger than {MAX_UPLOAD_BYTES} bytes; split it")
    records = _within_stores(parser.parse(source, data), key.stores)
    return report_body(await _run(gw, records, adapter, key.channel, source))


async def _bounded_body(request: Request) -> bytes:
    """The body, refused once it is past MAX_WEBHOOK_BYTES (by its Content-Length, or as it
    arrives): an unsigned sender must not make the gateway hold more than that."""
    declared = request.headers.get("content-length", "")
    length = declared.lstrip("0") or "0"  # compared by its digits first: int() of any length is not free
    too_large = bad_request("body", f"larger than {MAX_WEBHOOK_BYTES} bytes")
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(length) > len(str(MAX_WEBHOOK_BYTES)) or int(length) > MAX_WEBHOOK_BYTES)
    ):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_WEBHOOK_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/webhooks/{vendor}", summary="A vendor's signed purchase or return (HMAC-SHA256)", responses={
    202: {"model": s.ImportReport, "description": "Accepted"},
    200: {"model": s.ImportReport, "description": "Already received (Idempotent-Replayed: true)"},
    422: {"model": s.ImportReport, "description": "Quarantined: `quarantined` names the field at fault"},
})  # fmt: skip
async def webhook(
    vendor: str, request: Request, gw: GatewayDep,
    x_signature: Annotated[str | None, Header()] = None,
    x_signature_timestamp: Annotated[str | None, Header()] = None,
) -> JSONResponse:  # fmt: skip
    body = await _bounded_body(request)
    try:
        verify_signature(gw.settings.webhook_secret.encode(), body, x_signature, timestamp=x_signature_timestamp,
                         now=gw.clock.now())  # fmt: skip
    except SignatureError as exc:
        raise unauthorized(f"webhook signature refused: {exc}") from None
    adapter = WebhookAdapter()
    report = await _run(
        gw, adapter.parse(f"webhook:{vendor}", body), "webhook", adapter.default_channel, f"webhook-{vendor}"
    )
    status = 422 if report.quarantined else 202 if report.accepted else 200
    headers = {"Idempotent-Replayed": "true"} if status == 200 else {}
    return JSONResponse(report_body(report), status_code=status, headers=headers)
