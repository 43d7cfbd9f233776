"""Bulk purchases over the event bus: the ledger consumes the ingest topic through the same
accrual path as RecordPurchase, committing offsets only after the postings are durable.

Purchases are deduped on their natural key (program, channel, store, receipt), so a batch
delivered again after a crash replays instead of earning twice. Within a batch, different
members run concurrently and one member's purchases run in order (they share a partition
key, so they arrive in order). A purchase the ledger refuses for good (bad field, unknown
member, a member not active) goes to the dead-letter topic with the reason; anything else
(rules_svc slow is not one: the purchase waits as pending accrual) leaves the batch
uncommitted to come again.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError

from ledger_svc import convert as cv
from ledger_svc.domain import LedgerError
from ledger_svc.service import LedgerService
from pointmesh.consumers import Poison, by_key, run_group
from pointmesh.events import INGEST_PURCHASES, BusMessage, EventBus
from pointmesh.v1 import ledger_pb2

GROUP = "ledger-ingest"


class IngestWorker:
    def __init__(self, service: LedgerService, bus: EventBus, consumer: str, *, batch: int = 500) -> None:
        self.service = service
        self.bus = bus
        self.consumer = consumer
        self.batch = batch
        self.stop = asyncio.Event()

    async def _purchase(self, message: BusMessage) -> None:
        try:
            request = ledger_pb2.RecordPurchaseRequest.FromString(message.payload)
        except DecodeError as exc:
            raise Poison(f"not a RecordPurchaseRequest: {exc}") from exc
        try:
            await self.service.accrual.record_purchase(cv.purchase_cmd(request))
        except LedgerError as exc:
            raise Poison(f"{exc.field}: {exc.message}" if exc.field else exc.message) from exc

    async def run(self) -> None:
        handle = by_key(self.bus, INGEST_PURCHASES, GROUP, self._purchase)
        await run_group(self.bus, INGEST_PURCHASES, GROUP, self.consumer, handle, stop=self.stop,
                        max_messages=self.batch)  # fmt: skip
