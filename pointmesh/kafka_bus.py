"""The event bus on Apache Kafka, through aiokafka.

Why aiokafka: every pointmesh service is an asyncio process, and aiokafka is asyncio-native
(no callback thread to marshal back onto the loop), supports the idempotent producer
(`enable_idempotence`, acks=all) and manual offset commits, and installs as a wheel with no
system library. confluent-kafka is faster per message but its asyncio use goes through
threads and callbacks; the relay and consumers here batch, so throughput is not the limit.

Mapping of the interface: the partition key is the Kafka record key (one member's events in
one partition, in order); headers carry event id, type and schema; a BusMessage position is
"partition:offset"; `subscribe` assigns every partition without a group (a broadcast
reader); `group` is a Kafka consumer group with auto-commit off; `rewind` commits, for every
partition, the first offset at or after a time (the group must have no running members,
like `kafka-consumer-groups --reset-offsets`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, TopicAlreadyExistsError, for_code
from aiokafka.structs import OffsetAndMetadata

from pointmesh.events import BusMessage, OutgoingEvent, refuse_oversize

log = logging.getLogger(__name__)
_STANDARD = {"event_id", "type", "schema"}
# Said here, not left to aiokafka's default: MAX_EVENT_BYTES (events.py) must stay under it with
# room for a record's framing, or an event that passed the check could be refused mid-batch.
_MAX_REQUEST_BYTES = 1_048_576


def _text(value: bytes | None) -> str:
    # Kafka allows null and binary header values (tracing agents, Connect add them): a record
    # must reach its handler (and the dead-letter topic if need be), never fail in the poll.
    return (value or b"").decode(errors="replace")


def _message(record: ConsumerRecord[bytes, bytes]) -> BusMessage:
    headers = {k: _text(v) for k, v in record.headers}
    return BusMessage(
        position=f"{record.partition}:{record.offset}",
        key=_text(record.key),
        event_id=headers.get("event_id", ""),
        event_type=headers.get("type", ""),
        payload=record.value or b"",
        schema=headers.get("schema", ""),
        timestamp_ms=record.timestamp,
        headers=tuple((k, v) for k, v in headers.items() if k not in _STANDARD),
    )


def _headers(ev: OutgoingEvent) -> list[tuple[str, bytes]]:
    standard = [("event_id", ev.event_id), ("type", ev.event_type), ("schema", ev.schema)]
    return [(k, v.encode()) for k, v in (*standard, *ev.headers)]


class KafkaBus:
    def __init__(
        self, bootstrap: str, *, partitions: int = 6, replication: int = 1, client_id: str = "pointmesh"
    ) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.replication = replication
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()

    async def _started_producer(self) -> AIOKafkaProducer:
        async with self._producer_lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap, client_id=self.client_id, enable_idempotence=True, acks="all",
                    linger_ms=2, request_timeout_ms=10_000, max_request_size=_MAX_REQUEST_BYTES,
                )  # fmt: skip
                await producer.start()
                self._producer = producer
            return self._producer

    async def publish(self, topic: str, events: Sequence[OutgoingEvent]) -> None:
        """Sends in order and returns once the broker acknowledged every event (acks=all).

        The idempotent producer keeps its own retries from duplicating or reordering; a
        failure raises, and the caller (the outbox relay) sends the batch again later. A batch
        with an event over MAX_EVENT_BYTES is refused whole (EventTooLarge) before anything is
        sent: the producer would refuse only that record, after queueing the ones before it.
        """
        if not events:
            return
        refuse_oversize(topic, events)
        producer = await self._started_producer()
        try:
            futures = [
                await producer.send(topic, value=ev.payload, key=ev.key.encode(), headers=_headers(ev)) for ev in events
            ]
            await asyncio.gather(*futures)
        except Exception:
            # A producer that lost its broker may hold a stale state; the next publish starts afresh.
            await self._drop_producer()
            raise

    async def _drop_producer(self) -> None:
        async with self._producer_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5)
            except Exception as exc:  # already broken; nothing more to flush
                log.debug("closing a failed Kafka producer: %s", exc)

    async def subscribe(self, topic: str, after: str = "$", *, block_ms: int = 1000) -> AsyncIterator[BusMessage]:
        """Every partition, no group: "0" starts at the beginning, anything else at the end
        (a Kafka position names one partition, so it cannot resume all of them)."""
        consumer = await self._assigned_consumer(None)
        try:
            partitions = await _partitions(consumer, topic)
            consumer.assign(partitions)
            if after == "0":
                await consumer.seek_to_beginning(*partitions)
            else:
                await consumer.seek_to_end(*partitions)
            while True:
                batch = await consumer.getmany(timeout_ms=block_ms, max_records=500)
                for records in batch.values():
                    for record in records:
                        yield _message(record)
        finally:
            await consumer.stop()

    async def latest_position(self, topic: str) -> str:
        """Always "$": a position names one partition and `subscribe` cannot resume them all, so a
        Kafka tail restarts at the end (a known limit, docs/events.md)."""
        return "$"

    def position_at(self, when: datetime) -> str:
        """Always "$", as latest_position."""
        return "$"

    async def _assigned_consumer(self, group: str | None) -> AIOKafkaConsumer:
        """A started consumer that will be assigned partitions by hand (no group membership)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id=self.client_id, group_id=group,
                                    enable_auto_commit=False)  # fmt: skip
        await consumer.start()
        return consumer

    def group(self, topic: str, group: str, consumer: str) -> KafkaGroupConsumer:
        return KafkaGroupConsumer(self, topic, group, consumer)

    async def rewind(self, topic: str, group: str, when: datetime) -> None:
        """The group's next message per partition is the first stamped at or after `when`. A time
        before 1970 is the start, as on Redis (Kafka refuses a negative timestamp)."""
        since_ms = max(0, int(when.timestamp() * 1000))
        consumer = await self._assigned_consumer(group)
        try:
            partitions = await _partitions(consumer, topic)
            consumer.assign(partitions)
            found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
            ends = await consumer.end_offsets(partitions)
            offsets = {tp: OffsetAndMetadata(found[tp].offset if found[tp] else ends[tp], "") for tp in partitions}
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError):  # the group's members refuse an outsider
                raise RuntimeError(
                    f"group {group} has consumers running on {topic}: stop them first, then rewind"
                ) from None
        finally:
            await consumer.stop()

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [NewTopic(t, num_partitions=self.partitions, replication_factor=self.replication)
                      for t in topics if t not in existing]  # fmt: skip
            if wanted:
                # The broker answers each topic with an error code rather than failing the call:
                # one that already exists (another process created it first) is fine, any other
                # refusal (a replication factor the cluster cannot give, a policy, an ACL) is not.
                response = await admin.create_topics(wanted)
                refused = [(topic, code, message) for topic, code, message in _topic_errors(response)
                           if code not in (0, TopicAlreadyExistsError.errno)]  # fmt: skip
                if refused:
                    topic, code, message = refused[0]
                    raise RuntimeError(f"Kafka refused to create topic {topic}: {for_code(code).__name__} {message}")
        finally:
            await admin.close()

    async def ping(self) -> None:
        """One bootstrap server answers a TCP connect."""
        host, _, port = self.bootstrap.split(",")[0].rpartition(":")
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
        writer.close()

    async def close(self) -> None:
        await self._drop_producer()


def _topic_errors(response: Any) -> list[tuple[str, int, str]]:
    """(topic, error code, message) per topic of a CreateTopics response (v0 has no message)."""
    return [(row[0], row[1], row[2] if len(row) > 2 and row[2] else "") for row in response.topic_errors]


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"Kafka topic {topic} does not exist; run `pointmesh events topics create`")


class KafkaGroupConsumer:
    def __init__(self, bus: KafkaBus, topic: str, group: str, consumer: str) -> None:
        self.bus, self.topic, self.group_name, self.consumer_name = bus, topic, group, consumer
        self._consumer: AIOKafkaConsumer | None = None

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                self.topic, bootstrap_servers=self.bus.bootstrap, client_id=self.consumer_name,
                group_id=self.group_name, enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=10_000, heartbeat_interval_ms=1_000,
            )  # fmt: skip
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def poll(self, *, max_messages: int = 100, block_ms: int = 1000) -> list[BusMessage]:
        consumer = await self._started()
        batch = await consumer.getmany(timeout_ms=block_ms, max_records=max_messages)
        return [_message(r) for records in batch.values() for r in records]

    async def commit(self, messages: Sequence[BusMessage]) -> None:
        """Commits past the last of `messages` in each partition (processing is in order)."""
        if not messages:
            return
        consumer = await self._started()
        offsets: dict[TopicPartition, int] = {}
        for m in messages:
            partition, offset = (int(x) for x in m.position.split(":"))
            tp = TopicPartition(self.topic, partition)
            offsets[tp] = max(offsets.get(tp, 0), offset + 1)
        # A partition revoked by a rebalance while the batch ran is not this consumer's to commit
        # (its new owner reads those messages again: at least once); committing it would fail
        # the commit of every partition kept, and the consumer would leave and rejoin the group.
        kept = consumer.assignment()
        gone = [tp for tp in offsets if tp not in kept]
        if gone:
            log.info("partitions %s were reassigned during the batch; their messages go to the new owner",
                     sorted(tp.partition for tp in gone))  # fmt: skip
        owned = {tp: OffsetAndMetadata(o, "") for tp, o in offsets.items() if tp in kept}
        if not owned:
            return
        try:
            await consumer.commit(owned)
        except (CommitFailedError, IllegalStateError) as exc:  # a rebalance between the check and the commit
            log.warning("commit lost to a rebalance; the new owners read these messages again (%s)", exc)

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
