"""Running a consumer group on the event bus: schema check, dead-letter, commit after work.

A handler gets each message in order and either returns (done), raises `Poison` (the message
can never be processed: it goes to `<topic>.dlq` with the reason once its batch is through, and
the group moves on), or raises anything else (a transient failure: nothing is committed, the
consumer reopens after a pause and the uncommitted messages come again). Handlers make their effect idempotent by
event id, so a redelivered message never pays twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
from prometheus_client import Gauge

from pointmesh.events import (
    HEADER_ROOM,
    MAX_EVENT_BYTES,
    SCHEMA_MAJOR,
    BusMessage,
    EventBus,
    GroupConsumer,
    OutgoingEvent,
    dead_letter_topic,
    event_bytes,
    header_bytes,
)

log = logging.getLogger(__name__)
LAG = Gauge("pointmesh_event_lag_seconds", "Age of the last event a consumer group finished, by topic and group.",
            ["topic", "group"])  # fmt: skip
RETRY_PAUSE_SECONDS = 1.0


def consumer_name(service: str, data_dir: Path, address: str) -> str:
    """The name an instance consumes under, the same after a restart (host or pod name, data
    directory, listening address): a restarted consumer then reads its own unacknowledged
    messages before new ones, so a member's events keep their order. A name per process (pid)
    made a restarted one read new events first and get the old ones back only when another
    consumer's claim timed out. Two instances on one host differ in their address at least.
    (A Deployment's pod gets a new name on each reschedule; its old pending messages then go
    to the group's other consumers after the claim timeout.)"""
    tag = hashlib.sha256(f"{data_dir.resolve()}|{address}".encode()).hexdigest()[:8]
    return f"{service}-{socket.gethostname()}-{tag}"


class Poison(Exception):
    """The message cannot be processed, now or later (undecodable, invalid, unknown schema)."""


Handler = Callable[[BusMessage], Awaitable[None]]


def check_schema(message: BusMessage) -> None:
    major = message.schema_major
    if major is None:
        raise Poison(f"no readable schema header (got {message.schema!r})")
    if major != SCHEMA_MAJOR:
        raise Poison(f"schema major version {major} is unknown here (this consumer reads {SCHEMA_MAJOR})")


DLQ_REASON_CHARS = 2_000  # an exception's text can be as long as the message it failed on
# Room a dead-letter copy keeps under HEADER_ROOM for the small headers added later: its own
# payload or field notes, and the `redriven_from` a redrive adds.
DLQ_SPARE_BYTES = 256


async def dead_letter(bus: EventBus, topic: str, group: str, message: BusMessage, reason: str) -> None:
    """Publishes the message's copy to the group's dead-letter topic. The copy always fits the
    bus, or its group would read the same poison for ever: a message whose own headers leave no
    room for the copy's `dlq_*` ones (ours, taken up to HEADER_ROOM; a foreign producer's, of any
    size) goes without them, their size said in `dlq_headers_dropped`; one over MAX_EVENT_BYTES
    (a foreign producer's: Redis has no cap of its own) without its payload
    (`dlq_payload_dropped`), and, if its key, id or type alone are too large, with those cut."""
    log.error("dead-lettering %s %s from %s (group %s): %s", message.event_type or "message",
              message.event_id or message.position, topic, group, reason)  # fmt: skip
    own = tuple((k, v) for k, v in message.headers if not k.startswith("dlq_"))
    about = (("dlq_reason", reason[:DLQ_REASON_CHARS]), ("dlq_source", topic), ("dlq_group", group),
             ("dlq_position", message.position[:DLQ_REASON_CHARS]), ("dlq_timestamp_ms", str(message.timestamp_ms)))  # fmt: skip
    if header_bytes((*own, *about)) + DLQ_SPARE_BYTES > HEADER_ROOM:
        log.error("the dead-letter copy of %s goes without its own %d bytes of headers, over the bus's room",
                  message.event_id or message.position, header_bytes(own))  # fmt: skip
        own = (("dlq_headers_dropped", str(header_bytes(own))),)
    copy = OutgoingEvent(message.key, message.event_id, message.event_type, message.payload, message.schema,
                         headers=(*own, *about))  # fmt: skip
    if event_bytes(copy) > MAX_EVENT_BYTES:
        log.error("the dead-letter copy of %s goes without its %d-byte payload, over the bus's limit",
                  message.event_id or message.position, len(message.payload))  # fmt: skip
        copy = replace(copy, payload=b"", headers=(*copy.headers, ("dlq_payload_dropped", str(len(message.payload)))))
    if event_bytes(copy) > MAX_EVENT_BYTES:
        cut = DLQ_REASON_CHARS
        copy = replace(copy, key=copy.key[:cut], event_id=copy.event_id[:cut], event_type=copy.event_type[:cut],
                       schema=copy.schema[:cut], headers=(*copy.headers, ("dlq_fields_cut", str(cut))))  # fmt: skip
    await bus.publish(dead_letter_topic(topic), [copy])


BatchHandler = Callable[[list[BusMessage]], Awaitable[None]]


# Errors a retry cannot cure: the same message fails the same way each time. After this many
# attempts the message is dead-lettered, so one bad message cannot stop its group for ever.
# Anything else (a store or service that is down, a timeout) is retried without limit: an
# outage must never send good messages to the dead-letter topic.
MAX_DETERMINISTIC_ATTEMPTS = 5
_DETERMINISTIC: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, ArithmeticError, LookupError,
)  # fmt: skip
_REFUSED_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
})  # fmt: skip


def deterministic(exc: BaseException) -> bool:
    """An error no retry cures: the same message fails the same way each time."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _REFUSED_CODES
    return isinstance(exc, _DETERMINISTIC)


class Attempts:
    """Deterministic failures per message position (this process): a message is given up on,
    with the reason its dead-letter copy carries, once it failed MAX_DETERMINISTIC_ATTEMPTS times."""

    def __init__(self) -> None:
        self._failures: dict[str, int] = {}
        # Positions this process dead-lettered lately: a batch whose commit failed after its
        # refused messages were dead-lettered is read again, and must not dead-letter them twice
        # (a redrive would send each back twice). Insertion-ordered, the oldest forgotten first.
        self.lettered: dict[str, None] = {}

    def failed(self, position: str, exc: BaseException) -> str | None:
        """Counts a failure; the dead-letter reason once the message is out of attempts, else None."""
        attempts = self._failures.get(position, 0) + 1
        if attempts < MAX_DETERMINISTIC_ATTEMPTS:
            self._failures[position] = attempts
            return None
        return f"failed {attempts} times: {type(exc).__name__}: {exc}"

    def clear(self, position: str) -> None:
        self._failures.pop(position, None)


Refused = list[tuple[BusMessage, str]]  # messages given up on in a batch, with the reason
LETTERED_KEPT = 10_000  # dead-lettered positions remembered (a batch read again is at most 100)


def guarded(handle: Handler, attempts: Attempts) -> Callable[[BusMessage, Refused], Awaitable[None]]:
    """The handler behind the schema check: poison, and a message that keeps failing with an
    error no retry cures (after a few attempts), is added to the batch's refused list instead
    of raising. The list is dead-lettered only once the whole batch is through: a batch read
    again after a later message failed would otherwise dead-letter the same message again."""

    async def run(message: BusMessage, refused: Refused) -> None:
        try:
            check_schema(message)
            await handle(message)
        except Poison as poison:
            refused.append((message, str(poison)))
        except Exception as exc:
            if not deterministic(exc):
                raise
            reason = attempts.failed(message.position, exc)
            if reason is None:
                raise
            refused.append((message, reason))

    return run


async def _batch_through(bus: EventBus, topic: str, group: str, messages: list[BusMessage], refused: Refused,
                         attempts: Attempts) -> None:  # fmt: skip
    """The batch is done: its refused messages go to the dead-letter topic, once, and what was
    counted for its messages is forgotten."""
    await dead_letter_once(bus, topic, group, refused, attempts)
    for message in messages:
        attempts.clear(message.position)


async def dead_letter_once(bus: EventBus, topic: str, group: str, refused: Refused, attempts: Attempts) -> None:
    """Dead-letters each refused message unless this consumer did already: a batch delivered
    again (its commit failed after the dead letters went) would send them a second time."""
    for message, reason in refused:
        if message.position in attempts.lettered:
            continue
        await dead_letter(bus, topic, group, message, reason)
        attempts.lettered[message.position] = None
        if len(attempts.lettered) > LETTERED_KEPT:
            del attempts.lettered[next(iter(attempts.lettered))]


def in_order(bus: EventBus, topic: str, group: str, handle: Handler) -> BatchHandler:
    """Every message of a batch, one after another."""
    attempts = Attempts()
    one = guarded(handle, attempts)

    async def run(messages: list[BusMessage]) -> None:
        refused: Refused = []
        for message in messages:
            await one(message, refused)
        await _batch_through(bus, topic, group, messages, refused, attempts)

    return run


def by_key(bus: EventBus, topic: str, group: str, handle: Handler) -> BatchHandler:
    """Different keys (members) concurrently, each key's messages in order."""
    attempts = Attempts()
    one = guarded(handle, attempts)

    async def key_in_order(messages: list[BusMessage], refused: Refused) -> None:
        for message in messages:
            await one(message, refused)

    async def run(messages: list[BusMessage]) -> None:
        keyed: dict[str, list[BusMessage]] = {}
        for m in messages:
            keyed.setdefault(m.key, []).append(m)
        refused: Refused = []
        # Every key's chain ends before a failure is raised: the batch is then read again, and a
        # chain still running would handle the same key twice at once.
        outcomes = await asyncio.gather(*(key_in_order(ms, refused) for ms in keyed.values()),
                                        return_exceptions=True)  # fmt: skip
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        await _batch_through(bus, topic, group, messages, refused, attempts)

    return run


async def run_group(
    bus: EventBus, topic: str, group: str, consumer: str, handle_batch: BatchHandler, *, stop: asyncio.Event,
    max_messages: int = 100, block_ms: int = 500, linger_s: float = 0.0,
) -> None:  # fmt: skip
    """Consumes until `stop` is set; commits each batch only after every message in it is done.

    A failure leaves the batch uncommitted; the consumer reopens after a pause and reads it again.
    `linger_s` is Kafka's fetch.max.wait for a consumer that may lag a little: after a batch
    short of `max_messages` it waits that long before polling again, so a busy stream is read
    in fewer, fuller batches (every poll and commit is a round trip and a wake-up of the loop
    that serves the service's own calls).
    """
    member = bus.group(topic, group, consumer)
    try:
        while not stop.is_set():
            try:
                messages = await member.poll(max_messages=max_messages, block_ms=block_ms)
                await handle_batch(messages)
                await member.commit(messages)
                if messages and messages[-1].timestamp_ms:
                    LAG.labels(topic, group).set(max(0.0, time.time() - messages[-1].timestamp_ms / 1000))
                if linger_s and 0 < len(messages) < max_messages:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), linger_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer %s of %s on %s failed (%s: %s); reopening after a pause",
                            consumer, group, topic, type(exc).__name__, exc)  # fmt: skip
                await _close_quietly(member)
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
                member = bus.group(topic, group, consumer)
    finally:
        await member.close()


async def _close_quietly(member: GroupConsumer) -> None:
    """Closing a consumer that just failed may fail too (its broker gone): the loop must go on
    and reopen, not end the consumer task for good."""
    try:
        await member.close()
    except Exception as exc:
        log.warning("closing a failed consumer failed too (%s: %s)", type(exc).__name__, exc)
