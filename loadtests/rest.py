"""REST mixed scenario (Locust FastHttpUser): the channels' traffic in realistic proportions.

Per user action: POS purchase 45%, web purchase 15%, balance read 28%, redemption 8%, return
4% (of one of the user's own earlier purchases). Members are drawn from a Zipf distribution
(s = 1.1) over the member pool, so a few are hot. Think time 1-3 s per user (set by
LOADTEST_WAIT_MIN/MAX). Configuration comes from the environment the runner sets
(loadtests/run.py): the API keys, the member pool file, the target must be 127.0.0.1.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser

MEMBERS: list[str] = (
    json.loads(Path(os.environ["LOADTEST_MEMBERS"]).read_text()) if "LOADTEST_MEMBERS" in os.environ else []
)
CUM_WEIGHTS = list(itertools.accumulate(1 / (k**1.1) for k in range(1, len(MEMBERS) + 1)))
CATEGORIES = ("apparel", "outdoor", "footwear", "misc")
# Receipts stamped this far from now (replaying traffic against a ledger whose clock differs).
RECEIPT_OFFSET = timedelta(seconds=float(os.environ.get("LOADTEST_RECEIPT_TIME_OFFSET", "0")))


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _loopback_only(environment: Any, **_: Any) -> None:
    host = urlparse(environment.host or "").hostname
    if host != "127.0.0.1":
        raise SystemExit(f"load tests target 127.0.0.1 only, not {host!r}")


def hot_member() -> str:
    return random.choices(MEMBERS, cum_weights=CUM_WEIGHTS)[0]


def basket(member: str, amount: int) -> dict[str, Any]:
    line = {"sku": f"sku-{random.randint(1, 500)}", "category": random.choice(CATEGORIES), "quantity": 1,
            "amount": {"amount_minor": amount, "currency": "EUR"}}  # fmt: skip
    return {"member_id": member, "store_id": "HEL-01", "receipt_id": f"lt-{uuid.uuid4().hex[:16]}",
            "total": {"amount_minor": amount, "currency": "EUR"}, "lines": [line],
            "receipt_time": (datetime.now(UTC) + RECEIPT_OFFSET - timedelta(seconds=5)).isoformat()}  # fmt: skip


class Channels(FastHttpUser):
    wait_time = between(
        float(os.environ.get("LOADTEST_WAIT_MIN", "1")), float(os.environ.get("LOADTEST_WAIT_MAX", "3"))
    )

    def on_start(self) -> None:
        self.pos = {"Authorization": f"Bearer {os.environ['LOADTEST_POS_KEY']}"}
        self.web = {"Authorization": f"Bearer {os.environ['LOADTEST_WEB_KEY']}"}
        self.mine: list[str] = []

    def _purchase(self, headers: dict[str, str], name: str) -> None:
        member = hot_member()
        body = basket(member, random.randint(500, 20_000))
        if headers is self.web:
            body.pop("store_id")
        with self.client.post("/v1/purchases", json=body, headers={**headers, "Idempotency-Key": body["receipt_id"]},
                              name=name, catch_response=True) as response:  # fmt: skip
            if response.status_code == 201:
                if response.json()["status"] == "EARNED":  # fraud may refuse or hold a hot member's purchase
                    self.mine.append(response.json()["purchase_id"])
                response.success()
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(45)
    def pos_purchase(self) -> None:
        self._purchase(self.pos, "POST /v1/purchases (pos)")

    @task(15)
    def web_purchase(self) -> None:
        self._purchase(self.web, "POST /v1/purchases (web)")

    @task(28)
    def balance(self) -> None:
        self.client.get(f"/v1/members/{hot_member()}/balance", headers=self.pos, name="GET /v1/members/{id}/balance")

    @task(8)
    def redeem(self) -> None:
        body = {"member_id": hot_member(), "points": random.randint(1, 20)}
        with self.client.post("/v1/redemptions", json=body, name="POST /v1/redemptions", catch_response=True,
                              headers={**self.pos, "Idempotency-Key": uuid.uuid4().hex}) as response:  # fmt: skip
            # Too few points is the business answer for a cold member, not a failure of the system.
            if response.status_code in (201, 202, 422):
                response.success()

    @task(4)
    def return_(self) -> None:
        if not self.mine:
            return
        purchase = self.mine.pop(random.randrange(len(self.mine)))
        body = {"store_id": "HEL-01", "lines": [{"line_index": 0, "quantity": 1}]}
        with self.client.post(f"/v1/purchases/{purchase}/returns", json=body, name="POST /v1/purchases/{id}/returns",
                              headers={**self.pos, "Idempotency-Key": uuid.uuid4().hex},
                              catch_response=True) as response:  # fmt: skip
            if response.status_code != 201:
                response.failure(f"{response.status_code}: {response.text[:300]}")
