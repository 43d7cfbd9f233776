"""The fraud team's review queue: items held by fraud screening, and their decisions.

The operator recorded on a decision is the API key that made it, never a name in the body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gateway import convert as cv
from gateway import schemas as s
from gateway.deps import GatewayDep, IdPath, Write, call, scoped, writing
from gateway.strict_json import StrictJsonRoute
from pointmesh.v1 import ledger_pb2

router = APIRouter(prefix="/v1/ops/reviews", tags=["ops"], route_class=StrictJsonRoute)
LEDGER = "ledger_svc"
STATUSES = {"OPEN": ledger_pb2.REVIEW_STATUS_OPEN, "APPROVED": ledger_pb2.REVIEW_STATUS_APPROVED,
            "REJECTED": ledger_pb2.REVIEW_STATUS_REJECTED}  # fmt: skip


@router.get("", response_model=s.ReviewPage, dependencies=[scoped("ops:read")],
            summary="Items under fraud review, oldest first")  # fmt: skip
async def list_reviews(
    gw: GatewayDep,
    status: Annotated[str, Query(pattern="^(OPEN|APPROVED|REJECTED)$")] = "OPEN",
    member_id: Annotated[str, Query(max_length=s.MAX_ID_LENGTH)] = "",
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str, Query(max_length=s.MAX_PAGE_TOKEN_LENGTH)] = "",
) -> s.ReviewPage:
    result = await call(LEDGER, gw.ledger.ListReviews(ledger_pb2.ListReviewsRequest(
        status=STATUSES[status], member_id=member_id, page_size=page_size, page_token=page_token,
    )))  # fmt: skip
    return s.ReviewPage(reviews=[cv.review(r) for r in result.reviews], next_page_token=result.next_page_token)


async def _decide(review_id: str, approve: bool, body: s.ReviewDecision, gw: GatewayDep, write: Write) -> s.Review:
    api_key, key = write
    request = ledger_pb2.DecideReviewRequest(idempotency_key=key, review_id=review_id, approve=approve,
                                             operator_id=api_key.key_id, note=body.note)  # fmt: skip
    return cv.review((await call(LEDGER, gw.ledger.DecideReview(request))).review)


@router.post("/{review_id}/approve", response_model=s.Review,
             summary="Approve: release the pending credit, or capture the held redemption")  # fmt: skip
async def approve(review_id: IdPath, gw: GatewayDep, write: Annotated[Write, writing("ops:write")],
                  body: s.ReviewDecision | None = None) -> s.Review:  # fmt: skip
    return await _decide(review_id, True, body or s.ReviewDecision(), gw, write)


@router.post("/{review_id}/reject", response_model=s.Review,
             summary="Reject: cancel the pending credit, or void the hold (the points stay the member's)")  # fmt: skip
async def reject(review_id: IdPath, gw: GatewayDep, write: Annotated[Write, writing("ops:write")],
                 body: s.ReviewDecision | None = None) -> s.Review:  # fmt: skip
    return await _decide(review_id, False, body or s.ReviewDecision(), gw, write)
