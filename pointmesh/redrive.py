"""Sending dead letters back (`pointmesh events redrive`): once the cause is fixed (a bug
deployed away, a member reactivated, a rules version published), the messages one consumer
group dead-lettered go back on their topic.

Each message is sent back once: a consumer group of the dead-letter topic, `redrive.<group>`,
remembers how far redrives of that group went, so a second run sends only what was
dead-lettered since, and a message that fails again lands on the dead-letter topic anew (with
its new reason) for a later run. On Redis Streams the `redrive.<group>` group keeps its
consumer, so the dead-letter stream's trim keeps what was dead-lettered after that group's
last run (dead letters are what an operator wants kept). The copy keeps its key, event id, type, schema and headers,
without the `dlq_` ones. The topic's other groups see it too; their handlers dedupe by event
id, so one that had handled it treats it as a replay.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pointmesh.events import BusMessage, EventBus, OutgoingEvent, dead_letter_topic

REDRIVE_CONSUMER = "redrive"


@dataclass
class Redriven:
    sent: int = 0
    # Dead letters of other groups, passed over (each group's redrive has its own position).
    other_groups: int = 0
    # The run stopped at a dead letter of the group's it must not send yet (one that failed
    # again during the run, or came after it started): those are for the next run.
    more_left: bool = False
    reasons: Counter[str] = field(default_factory=Counter)


def header(message: BusMessage, name: str) -> str:
    return next((v for k, v in message.headers if k == name), "")


def _sent_back(message: BusMessage) -> OutgoingEvent:
    kept = tuple((k, v) for k, v in message.headers if not k.startswith("dlq_"))
    return OutgoingEvent(message.key, message.event_id, message.event_type, message.payload, message.schema,
                         headers=(*kept, ("redriven_from", message.position)))  # fmt: skip


def _mine(message: BusMessage, group: str) -> bool:
    return header(message, "dlq_group") == group


def _copy_of_sent(message: BusMessage, sent_positions: set[str]) -> bool:
    """A second dead-letter copy of a message this run sent back (the same position on the
    topic: its group dead-lettered it twice, say a commit that failed after the first copy):
    committed, not sent again. One that failed again after a redrive came from the redriven
    copy's own position."""
    position = header(message, "dlq_position")
    return bool(position) and position in sent_positions


def _sent_again(message: BusMessage, group: str, sent_ids: set[str]) -> bool:
    """One of the group's this run sent back already: it failed again. An empty event id is no
    id (a message without one matches nothing), and other groups' copies are theirs."""
    return bool(message.event_id) and message.event_id in sent_ids and _mine(message, group)


async def redrive(
    bus: EventBus, topic: str, group: str, *, limit: int | None = None, idle_seconds: float = 5.0
) -> Redriven:
    """Sends `group`'s dead letters from `<topic>.dlq` back on `topic`, at most `limit`.

    It goes through what was dead-lettered before the run started and stops at the first
    message stamped after that, or at one of the group's carrying an event id this run already
    sent back (one that failed again, its cause not fixed yet): those stay uncommitted for the
    next run, instead of going round in a loop (`more_left` says so). Other groups' copies of
    an event, and messages with no event id (a foreign producer's), never stop it: they are not
    this group's repeats. It also stops once the topic has been quiet for `idle_seconds` (a
    Kafka group needs a few seconds to be given its partitions, so an empty first poll does
    not mean nothing is left). A batch is committed only after its messages were published, so
    a crash resends some (harmless: consumers dedupe by event id) and never drops one."""
    done = Redriven()
    started_ms = int(time.time() * 1000)
    sent_ids: set[str] = set()
    sent_positions: set[str] = set()
    reader = bus.group(dead_letter_topic(topic), f"redrive.{group}", REDRIVE_CONSUMER)
    quiet_since = time.monotonic()
    try:
        while limit is None or done.sent < limit:
            wanted = 100 if limit is None else min(100, limit - done.sent)
            batch = await reader.poll(max_messages=wanted, block_ms=500)
            if not batch:
                if time.monotonic() - quiet_since > idle_seconds:
                    break
                continue
            quiet_since = time.monotonic()
            cut = next((i for i, m in enumerate(batch) if m.timestamp_ms > started_ms or
                        (_sent_again(m, group, sent_ids) and not _copy_of_sent(m, sent_positions))),
                       len(batch))  # fmt: skip
            taken = batch[:cut]
            mine = []
            for m in taken:
                if _mine(m, group) and not _copy_of_sent(m, sent_positions):
                    mine.append(m)
                    sent_positions.add(header(m, "dlq_position"))
            if mine:
                await bus.publish(topic, [_sent_back(m) for m in mine])
            if taken:
                await reader.commit(taken)
            done.sent += len(mine)
            done.other_groups += sum(1 for m in taken if not _mine(m, group))
            done.reasons.update(header(m, "dlq_reason") for m in mine)
            sent_ids.update(m.event_id for m in mine if m.event_id)
            if cut < len(batch):
                done.more_left = True
                break
    finally:
        await reader.close()
    return done
