"""How far each Kafka partition has been handled: the bridge's guard against replays that
come after the dedupe window.

A new consumer group, expired group offsets or an offset reset read a partition again from
further back than any dedupe key remembers (``NOTIFY_DEDUPE_TTL``). A partition's mark
says that every message up to it was handled (notified, set aside, or found to need
nothing) by some bridge: the highest such offset, and the newest message timestamp up to
it. A message at or below both is a replay, skipped before any Redis work. A topic deleted
and created again starts its offsets again, with newer timestamps, and is not taken for a
replay.

The mark is written once its batch is handled, before the batch's offsets are committed.
It is not written atomically with the notifications, and need not be: it only ever claims
what is already done. A crash before it is written leaves an older mark, and the
redelivered batch is deduplicated by ``eventId``; no mark ever skips a message that nothing
handled, except those a new group skipped on purpose by starting at the end of the topic
(``NOTIFY_KAFKA_OFFSET_RESET=latest``), which its first mark covers as well.

(Until 2026-12-03 the publish function kept a position per student, written with each
notification: the same guard, at the cost of two Redis writes per notification.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import TopicPartition

from notify.keys import Keys
from notify.redis_client import Client, text


@dataclass(frozen=True, slots=True)
class Mark:
    offset: int
    timestamp: int

    def covers(self, offset: int, timestamp: int) -> bool:
        """Whether a message at ``offset`` with ``timestamp`` was handled already."""
        return offset <= self.offset and timestamp <= self.timestamp

    def encode(self) -> str:
        return f"{self.offset} {self.timestamp}"

    @staticmethod
    def decode(raw: bytes | str | None) -> Mark | None:
        """The mark Redis holds; None for none, or for anything unreadable (no guard is
        safe: what it would have skipped is deduplicated or notified again, never lost)."""
        if raw is None:
            return None
        try:
            offset, timestamp = text(raw).split(" ")
            return Mark(int(offset), int(timestamp))
        except ValueError:
            return None


class Record(Protocol):
    """A Kafka message, as far as its mark is concerned."""

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> int: ...


def split(mark: Mark | None, records: Sequence[Record]) -> tuple[int, Mark | None]:
    """How many of one partition's ``records`` (in offset order) are replays, and the mark
    once the rest are handled too (None when there is no rest).

    The replays are a prefix: the first record ``mark`` does not cover has a higher offset
    than it (or, in a recreated topic, a newer timestamp), and the mark that includes it
    covers no later record, whose offsets are higher still.
    """
    replays = 0
    if mark is not None:
        while replays < len(records) and mark.covers(
            records[replays].offset, records[replays].timestamp
        ):
            replays += 1
    rest = records[replays:]
    if not rest:
        return replays, None
    newest = max(record.timestamp for record in rest)
    if mark is not None:
        newest = max(newest, mark.timestamp)
    return replays, Mark(rest[-1].offset, newest)


class Positions:
    """The marks of the partitions this bridge reads, kept in Redis for ``ttl`` seconds
    after their last write (``NOTIFY_POSITION_TTL``)."""

    def __init__(self, redis: Client, keys: Keys, ttl: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl
        self._known: dict[TopicPartition, Mark | None] = {}

    def forget(self) -> None:
        """Drop what is known: after a rebalance, another bridge may have moved a mark."""
        self._known.clear()

    async def load(
        self, partitions: Iterable[TopicPartition]
    ) -> Mapping[TopicPartition, Mark | None]:
        """The marks of ``partitions``, read from Redis for those not known yet."""
        wanted = list(partitions)
        missing = [tp for tp in wanted if tp not in self._known]
        if missing:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tp in missing:
                    pipe.get(self._keys.position(tp.topic, tp.partition))
                for tp, raw in zip(missing, await pipe.execute(), strict=True):
                    self._known[tp] = Mark.decode(raw)
        return {tp: self._known[tp] for tp in wanted}

    async def save(self, marks: Mapping[TopicPartition, Mark]) -> None:
        if not marks:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for tp, mark in marks.items():
                pipe.set(self._keys.position(tp.topic, tp.partition), mark.encode(), ex=self._ttl)
            await pipe.execute()
        self._known.update(marks)
