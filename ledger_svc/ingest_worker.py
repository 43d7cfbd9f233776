"""Bulk purchases over the event bus: the ledger consumes the ingest topic through the same
accrual path as RecordPurchase, committing offsets only after the postings are durable.

Purchases are deduped on their natural key (program, channel, store, receipt), so a batch
delivered again after a crash replays instead of earning twice. Each polled batch takes the
batch accrual path (batch_accrual.py): one EvaluateBatch and one ScoreBatch for all of it,
different members concurrently and one member's purchases in order (they share a partition
key, so they arrive in order). A purchase the ledger refuses for good (bad field, unknown
member, a member not active) goes to the dead-letter topic with the reason; anything else
(rules_svc slow is not one: the purchase waits as pending accrual) leaves the batch
uncommitted to come again.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError

from ledger_svc import commands as c
from ledger_svc import convert as cv
from ledger_svc.domain import LedgerError, Unavailable
from ledger_svc.service import LedgerService
from pointmesh.consumers import Poison, check_schema, dead_letter, deterministic, guarded, run_group
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
        self._alone = guarded(bus, INGEST_PURCHASES, GROUP, self._purchase)

    async def _purchases(self, messages: list[BusMessage]) -> None:
        """A polled batch through batch accrual (one EvaluateBatch and one ScoreBatch for all);
        refusals are dead-lettered; anything else raised, or a store closing under it, leaves the
        batch uncommitted for redelivery."""
        taken: list[BusMessage] = []
        commands: list[c.RecordPurchase] = []
        # Dead-lettered once the batch is through, so a batch delivered again after a failure
        # does not put them on the dead-letter topic twice.
        refused: list[tuple[BusMessage, str]] = []
        for message in messages:
            try:
                check_schema(message)
                commands.append(cv.purchase_cmd(ledger_pb2.RecordPurchaseRequest.FromString(message.payload)))
                taken.append(message)
            except Poison as poison:
                refused.append((message, str(poison)))
            except DecodeError as exc:
                refused.append((message, f"not a RecordPurchaseRequest: {exc}"))
            except LedgerError as exc:
                refused.append((message, _reason(exc)))
        await self._ingest(taken, commands)
        for message, reason in refused:
            await dead_letter(self.bus, INGEST_PURCHASES, GROUP, message, reason)

    async def _ingest(self, taken: list[BusMessage], commands: list[c.RecordPurchase]) -> None:
        try:
            outcomes = await self.service.ingest(commands)
        except Exception as exc:
            if not deterministic(exc):
                raise
            # A bug that fails the whole batch the same way each time: one purchase at a time
            # finds which, and the consumers' rule sends it to the dead-letter topic after a few
            # attempts, so one purchase cannot stop the topic (the others replay on their keys).
            for message in taken:
                await self._alone(message)
            return
        for outcome in outcomes:
            if isinstance(outcome, Unavailable):  # not the purchase's fault: deliver the batch again
                raise outcome
        for message, outcome in zip(taken, outcomes, strict=True):
            if isinstance(outcome, LedgerError):
                await dead_letter(self.bus, INGEST_PURCHASES, GROUP, message, _reason(outcome))

    async def _purchase(self, message: BusMessage) -> None:
        """One purchase alone, raising what the batch path dead-letters as Poison."""
        try:
            command = cv.purchase_cmd(ledger_pb2.RecordPurchaseRequest.FromString(message.payload))
        except (DecodeError, LedgerError) as exc:
            raise Poison(str(exc)) from exc
        (outcome,) = await self.service.ingest([command])
        if isinstance(outcome, Unavailable):
            raise outcome
        if isinstance(outcome, LedgerError):
            raise Poison(_reason(outcome))

    async def run(self) -> None:
        await run_group(self.bus, INGEST_PURCHASES, GROUP, self.consumer, self._purchases, stop=self.stop,
                        max_messages=self.batch)  # fmt: skip


def _reason(error: LedgerError) -> str:
    return f"{error.field}: {error.message}" if error.field else error.message
