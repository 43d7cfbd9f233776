"""What the ledger did, as Prometheus series: counted by the outbox relay, once per event it
publishes (so a unit of work that rolled back or ran again never counts), and gauges the
reconciliation pass sets from the books themselves."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from pointmesh.v1 import ledger_pb2

POINTS_ISSUED = Counter(
    "pointmesh_points_issued_total", "Points credited to members (pending credit included), by unit and funding source.",
    ["unit", "source"],
)  # fmt: skip
PURCHASES = Counter("pointmesh_purchases_total", "Purchases that earned, by channel.", ["channel"])
PURCHASE_POINTS = Counter(
    "pointmesh_purchase_points_total", "Points purchases earned, by channel and unit.", ["channel", "unit"]
)
POINTS_REDEEMED = Counter(
    "pointmesh_points_redeemed_total", "Points members spent, by unit and how (redeem, hold_capture).", ["unit", "how"]
)
POINTS_EXPIRED = Counter("pointmesh_points_expired_total", "Points that expired, by unit.", ["unit"])
REVIEWS_OPENED = Counter("pointmesh_fraud_reviews_opened_total", "Purchases and redemptions held for review.", ["kind"])
EVENTS_PUBLISHED = Counter("pointmesh_ledger_events_published_total", "Ledger events the relay published.", ["type"])
EVENTS_TOO_LARGE = Counter(
    "pointmesh_ledger_events_too_large_total",
    "Ledger events over the bus's size limit, logged and set aside rather than stalling the relay.", ["type"],
)  # fmt: skip
POINTS_OUTSTANDING = Gauge(
    "pointmesh_points_outstanding", "Members' posted balances (the programme's liability) at the last reconciliation.",
    ["unit"],
)  # fmt: skip
HOLDS_PENDING_POINTS = Gauge(
    "pointmesh_holds_pending_points", "Points held by open holds (fraud review holds included), last reconciliation."
)


def count(event: ledger_pb2.LedgerEvent) -> None:
    kind = event.WhichOneof("payload") or ""
    EVENTS_PUBLISHED.labels(kind).inc()
    if kind == "points_earned":
        POINTS_ISSUED.labels(event.unit, event.points_earned.funding_source).inc(event.points_earned.points)
    elif kind == "purchase_recorded":
        p = event.purchase_recorded
        PURCHASES.labels(p.channel).inc()
        for unit, points in p.earned.items():
            PURCHASE_POINTS.labels(p.channel, unit).inc(points)
    elif kind == "points_redeemed":
        POINTS_REDEEMED.labels(event.unit, "redeem").inc(abs(event.points_redeemed.points))
    elif kind == "hold_captured":
        POINTS_REDEEMED.labels(event.unit, "hold_capture").inc(abs(event.hold_captured.points))
    elif kind == "points_expired":
        POINTS_EXPIRED.labels(event.unit).inc(abs(event.points_expired.points))
    elif kind == "review_opened":
        REVIEWS_OPENED.labels(ledger_pb2.ReviewKind.Name(event.review_opened.kind)).inc()
