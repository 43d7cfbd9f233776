"""`pointmesh demo`: a scripted multichannel tour through the REST gateway of a running mesh
(start it with `make up`; the demo key `up` printed is read from the data directory).

Two members of one household: a store purchase explained rule by rule, the app's live
websocket printing the balance as it changes, a web purchase in yen, a redemption, a return in
another store, a franchise POS file that repeats a receipt (earns once) and carries a broken
line (quarantined), and a household transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from websockets.asyncio.client import connect


def _eur(minor: int, currency: str = "EUR") -> dict[str, Any]:
    return {"amount_minor": minor, "currency": currency}


class Tour:
    def __init__(self, client: httpx.AsyncClient, run: str, now: datetime) -> None:
        self.client = client
        self.run = run
        self.now = now

    async def post(self, path: str, body: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        headers = {"Idempotency-Key": f"{self.run}-{uuid.uuid4().hex[:8]}", **kw.pop("headers", {})}
        response = await self.client.post(path, json=body, headers=headers, **kw)
        if response.status_code >= 400:
            raise SystemExit(f"demo: {path} answered {response.status_code}: {response.text}")
        out: dict[str, Any] = response.json()
        return out

    async def balance(self, member: str) -> dict[str, Any]:
        out: dict[str, Any] = (await self.client.get(f"/v1/members/{member}/balance")).json()
        return out


def _show(label: str, b: dict[str, Any]) -> None:
    print(f"  {label:46s} balance {b['balance_points']:6d}  available {b['available_points']:6d}  "
          f"pending {b['pending_points']:4d}  debt {b['debt_points']:4d}")  # fmt: skip


def _explain(purchase: dict[str, Any]) -> None:
    for part in purchase["parts"]:
        where = f"line {part['line_index']}" if part["line_index"] >= 0 else "basket"
        print(f"      {part['rule_id']:22s} {part['unit']:13s} {part['points']:6d}  {where:7s} {part['detail']}")


@contextlib.asynccontextmanager
async def _live(ws_url: str, member: str, token: str) -> AsyncIterator[list[str]]:
    """The member's app: prints every live update it receives while the tour runs."""
    seen: list[str] = []
    async with connect(f"{ws_url}/v1/members/{member}/live?token={token}") as ws:
        await ws.recv()  # subscribed

        async def listen() -> None:
            async for raw in ws:
                event = json.loads(raw)
                seen.append(event["type"])
                print(
                    f"      [app, live] {event['type']:18s} {event['unit']} balance now {event['balance']['balance_points']}"
                )

        task = asyncio.create_task(listen())
        try:
            yield seen
            await asyncio.sleep(0.5)  # let the last events arrive
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def run_demo(url: str, key: str, now: datetime | None = None) -> None:
    run = uuid.uuid4().hex[:6]
    now = now or datetime.now(UTC)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=15.0) as client:
        tour = Tour(client, run, now)
        print(f"pointmesh demo against {url}")
        alice = (await tour.post("/v1/members", {"external_ids": [{"kind": "card", "value": f"{run}-A"}]}))["member_id"]
        bob = (await tour.post("/v1/members", {"external_ids": [{"kind": "card", "value": f"{run}-B"}]}))["member_id"]
        print(f"members: alice {alice} (card {run}-A), bob {bob}")
        token = (await tour.post(f"/v1/members/{alice}/tokens"))["token"]
        async with _live(url.replace("http://", "ws://"), alice, token) as seen:
            await _purchases(tour, alice)
        print(f"  alice's app saw {len(seen)} live updates: {', '.join(sorted(set(seen)))}")
        await _legacy(tour, client, alice)
        moved = await tour.post("/v1/transfers", {"source_member_id": alice, "destination_member_id": bob, "points": 50,
                                                  "reason": "household pooling"})  # fmt: skip
        if moved["status"] == "MOVED":
            _show("alice pools 50 points to bob", moved["debit"]["balance_after"])
            _show("bob", moved["credit"]["balance_after"])
        else:  # fraud screening sent it to review: the fraud desk decides
            print(f"alice's 50 points to bob wait for fraud review {moved['screening']['review_id']}")
    print("done: `pointmesh ledger reconcile` proves the books balance")


async def _purchases(tour: Tour, alice: str) -> None:
    at = (tour.now - timedelta(minutes=1)).isoformat()
    store = await tour.post("/v1/purchases", {
        "member_id": alice, "store_id": "HEL-01", "receipt_id": f"{tour.run}-HEL-0042", "receipt_time": at,
        "total": _eur(12980), "lines": [
            {"sku": "tent-2p", "category": "outdoor", "quantity": 1, "amount": _eur(9990)},
            {"sku": "wool-socks", "category": "socks", "quantity": 2, "amount": _eur(2990)}],
    })  # fmt: skip
    print(f"  Helsinki store purchase 129.80 EUR earns {store['earned']} (program v{store['program_version']}):")
    _explain(store)
    web = await tour.post("/v1/purchases", {
        "member_id": alice, "store_id": "", "receipt_id": f"{tour.run}-WEB-7", "receipt_time": at,
        "total": _eur(4500, "JPY"), "lines": [{"sku": "kettle", "category": "home", "quantity": 1, "amount": _eur(4500, "JPY")}],
    })  # fmt: skip
    print(f"  web shop order 4,500 JPY earns {web['earned']}")
    redeemed = await tour.post("/v1/redemptions", {"member_id": alice, "points": 100, "reference": "reward:coffee"})
    _show("alice redeems 100 points for a coffee", redeemed["balance_after"])
    back = await tour.post(f"/v1/purchases/{store['purchase_id']}/returns",
                           {"store_id": "LIS-01", "lines": [{"line_index": 1, "quantity": 2}]})  # fmt: skip
    print(f"  socks returned in Lisbon: {back['reversed']} taken back from the original breakdown")


async def _legacy(tour: Tour, client: httpx.AsyncClient, alice: str) -> None:
    at = (tour.now - timedelta(hours=1)).isoformat()
    header = "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount"
    rows = [
        f"P,LIS-01,{tour.run}-LIS-9,1,{at},{tour.run}-A,EUR,SKU-CAP,outdoor,1,19.90",
        f"P,LIS-01,{tour.run}-LIS-9,1,{at},{tour.run}-A,EUR,SKU-CAP,outdoor,1,19.90",
        f"P,LIS-01,{tour.run}-LIS-10,1,{at},{tour.run}-A,EUR,SKU-CAP,outdoor,1,19.9O",
    ]
    data = "\n".join([header, *rows]).encode()
    response = await client.post("/v1/legacy/imports", params={"adapter": "csv"},
                                 files={"file": (f"franchise-{tour.run}.csv", data, "text/csv")},
                                 headers={"Idempotency-Key": f"{tour.run}-file"})  # fmt: skip
    report = response.json()
    print(f"  franchise POS file: {report['accepted']} accepted, {report['duplicates']} duplicate, "
          f"{len(report['quarantined'])} quarantined")  # fmt: skip
    for q in report["quarantined"]:
        print(f"      line {q['line']}: {q['reason']}")
    _show("alice after the file", await tour.balance(alice))
