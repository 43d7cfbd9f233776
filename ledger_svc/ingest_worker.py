"""Bulk purchases over the event bus: the ledger consumes the ingest topic through the same
accrual path as RecordPurchase, committing offsets only after the postings are durable.

Purchases are deduped on their natural key (program, channel, store, receipt), so a batch
delivered again after a crash replays instead of earning twice. Each polled batch takes the
batch accrual path (batch_accrual.py): one EvaluateBatch and one ScoreBatch for all of it,
different members concurrently and one member's purchases in order (they share a partition
key, so they arrive in order). A purchase the ledger refuses for good (bad field, unknown
member, a member not active), or that cannot be decoded at all, goes to the dead-letter topic
with the reason; anything else (rules_svc slow is not one: the purchase waits as pending
accrual) leaves the batch uncommitted to come again.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError

from ledger_svc import commands as c
from ledger_svc import convert as cv
from ledger_svc.domain import LedgerError, Unavailable
from ledger_svc.service import LedgerService
from pointmesh.consumers import Attempts, Poison, check_schema, dead_letter_once, deterministic, run_group
from pointmesh.events import INGEST_PURCHASES, BusMessage, EventBus
from pointmesh.v1 import ledger_pb2

log = logging.getLogger(__name__)
GROUP = "ledger-ingest"


class IngestWorker:
    def __init__(self, service: LedgerService, bus: EventBus, consumer: str, *, batch: int = 500) -> None:
        self.service = service
        self.bus = bus
        self.consumer = consumer
        self.batch = batch
        self.stop = asyncio.Event()
        self._attempts = Attempts()  # deterministic failures of a purchase alone
        # Positions that went through alone in an earlier round of a batch still failing: the
        # proof a later failure of every purchase is in a step they share, not in them.
        self._passed_alone: set[str] = set()
        # Batches every purchase of which failed alone, since a purchase last went through: one
        # is taken for bad purchases (they use up their attempts); a second one, for a step they
        # all share that broke (they wait; nothing more goes to the dead-letter topic).
        self._failing_batches: set[frozenset[str]] = set()

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
            except Exception as exc:
                # Decoding is this message's alone (no store, no service): whatever else fails in
                # it fails the same way every time, so the message is refused, not the batch
                # left to come again for ever with nothing posted.
                refused.append((message, f"cannot be decoded: {type(exc).__name__}: {exc}"))
        try:
            outcomes = await self.service.ingest(commands)
        except Exception as exc:
            if not deterministic(exc):
                raise
            refused += await self._one_at_a_time(taken, commands, exc)
        else:
            for outcome in outcomes:
                if isinstance(outcome, Unavailable):  # not the purchase's fault: deliver the batch again
                    raise outcome
            refused += [(m, _reason(o)) for m, o in zip(taken, outcomes, strict=True) if isinstance(o, LedgerError)]
            self._forget(taken)
            self._failing_batches.clear()
        await dead_letter_once(self.bus, INGEST_PURCHASES, GROUP, refused, self._attempts)

    def _forget(self, taken: list[BusMessage]) -> None:
        """The batch is through: what earlier rounds counted for its purchases is of no more use
        (kept, it would grow with every batch that once failed)."""
        for message in taken:
            self._attempts.clear(message.position)
            self._passed_alone.discard(message.position)

    async def _one_at_a_time(
        self, taken: list[BusMessage], commands: list[c.RecordPurchase], batch_error: Exception
    ) -> list[tuple[BusMessage, str]]:
        """The batch failed the same way it would every time (a bug some purchase trips): each
        purchase alone finds which. One that runs out of attempts alone (consumers.Attempts) is
        refused (dead-lettered with the rest once the round is through), so it cannot stop the
        topic; the others post (or replay on their keys). When none succeeds alone, the batch
        alone cannot tell bad purchases from a broken step they share. It is taken for bad
        purchases (they use up their attempts: a batch of bad purchases alone must not stop the
        topic, and on Redis a reopened consumer reads its own pending ones first) unless one of
        them went through alone in an earlier round, or another batch failed the same way since
        anything last went through: then the step is broken, the batch waits and nothing is
        dead-lettered. A shared step that breaks sends at most one batch to the dead-letter
        topic, to be redriven once it is mended."""
        refused: list[tuple[BusMessage, str]] = []
        failed: list[tuple[BusMessage, Exception]] = []
        for message, command in zip(taken, commands, strict=True):
            try:
                (outcome,) = await self.service.ingest([command])
            except Exception as exc:
                if not deterministic(exc):
                    raise
                failed.append((message, exc))
                continue
            if isinstance(outcome, Unavailable):
                raise outcome
            self._passed_alone.add(message.position)  # a refusal too: the shared steps answered
            self._failing_batches.clear()
            if isinstance(outcome, LedgerError):
                refused.append((message, _reason(outcome)))
        if not failed:
            self._forget(taken)
            return refused
        if len(failed) == len(taken):
            seen = len(self._failing_batches)
            self._failing_batches.add(frozenset(m.position for m in taken))
            if len(self._failing_batches) > 1 or any(m.position in self._passed_alone for m in taken):
                if len(self._failing_batches) > seen:  # said once per batch, not every round
                    log.error("every purchase of %d batches fails alone (%s: %s): a step they share is broken; "
                              "they wait", len(self._failing_batches), type(batch_error).__name__, batch_error)  # fmt: skip
                for message in taken:
                    self._attempts.clear(message.position)
                raise batch_error
        return refused + self._count_attempts(taken, failed)

    def _count_attempts(
        self, taken: list[BusMessage], failed: list[tuple[BusMessage, Exception]]
    ) -> list[tuple[BusMessage, str]]:
        """Refuses the purchases out of attempts; raises while one has attempts left, so the
        batch comes again (those that went through replay on their keys)."""
        exhausted: list[tuple[BusMessage, str]] = []
        for message, exc in failed:
            reason = self._attempts.failed(message.position, exc)
            if reason is not None:
                exhausted.append((message, reason))
        if len(exhausted) < len(failed):
            raise failed[0][1]
        self._forget(taken)
        return exhausted

    async def run(self) -> None:
        await run_group(self.bus, INGEST_PURCHASES, GROUP, self.consumer, self._purchases, stop=self.stop,
                        max_messages=self.batch)  # fmt: skip


def _reason(error: LedgerError) -> str:
    return f"{error.field}: {error.message}" if error.field else error.message
