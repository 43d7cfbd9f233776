"""RecordPurchase calls that arrive together share one batch accrual pass.

A till's RecordPurchase waits for its answer, so it cannot be held back to fill a batch. But
under load many calls are in flight at once, and each unary call costs a rules_svc Evaluate,
a fraud_svc Score, a state read, a claim and a write of its own. The coalescer queues calls and
runs whatever is queued through BatchAccrual (one EvaluateBatch, one ScoreBatch, one read and
one claim for all of them) with at most MAX_IN_FLIGHT passes at a time: an idle ledger starts a
pass on the next loop turn, a busy one makes the next pass of everything that arrived meanwhile.
So batches grow with load and add no waiting when there is none.

BatchAccrual gives each purchase exactly what RecordPurchase gives it alone (its docstring
says how), and with `interactive` the services get their unary deadlines. Each caller gets its
own answer or its own error.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ledger_svc import commands as c
from ledger_svc.domain import LedgerError
from ledger_svc.purchases import PurchaseRecord

if TYPE_CHECKING:
    from ledger_svc.accrual import Accrual

MAX_IN_FLIGHT = 2
MAX_BATCH = 200

Waiting = tuple[c.RecordPurchase, "asyncio.Future[tuple[PurchaseRecord, bool]]"]


class PurchaseCoalescer:
    def __init__(self, accrual: Accrual) -> None:
        self.accrual = accrual
        self._queue: list[Waiting] = []
        self._in_flight = 0
        self._scheduled = False
        self._passes: set[asyncio.Task[None]] = set()

    async def record_purchase(self, cmd: c.RecordPurchase) -> tuple[PurchaseRecord, bool]:
        fut: asyncio.Future[tuple[PurchaseRecord, bool]] = asyncio.get_running_loop().create_future()
        self._queue.append((cmd, fut))
        if not self._scheduled:
            # On the next loop turn, so calls that arrive in this one join the same pass.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)
        return await fut

    def _start(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._pass(batch))
            self._passes.add(task)
            task.add_done_callback(self._passes.discard)

    async def _pass(self, batch: list[Waiting]) -> None:
        from ledger_svc.batch_accrual import BatchAccrual

        try:
            results = await BatchAccrual(self.accrual, interactive=True).run([cmd for cmd, _ in batch])
        except Exception as exc:  # a fault of the pass (not of a purchase) is every caller's
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        except BaseException:  # the ledger is stopping
            for _, fut in batch:
                fut.cancel()
            raise
        else:
            for (_, fut), outcome in zip(batch, results, strict=True):
                if fut.done():  # the caller gave up; the purchase is recorded all the same
                    continue
                if isinstance(outcome, LedgerError):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)
        finally:
            self._in_flight -= 1
            self._start()
