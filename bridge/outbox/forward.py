"""The forward stage's Kafka side: outbox rows to their topics, each student's in order.

Each partition's rows go as record batches built here, in ``id`` order, the next sent only
once Kafka acknowledged the one before, and a record batch is appended whole or not at all.
Rows handed to the producer one by one would queue as several batches instead, and without
the idempotent producer one whose request timed out is given up while the next lands: the
retry would then put a student's earlier events after later ones. Here a request given up
can cause a copy, never a reorder.

Whatever goes wrong in a call may leave the producer unusable (an idempotent producer's
sequence broken by a refused batch, a sender that died, requests it gave up), so the next
call starts a new one; until it has connected, the stage reads no row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.partitioner import DefaultPartitioner

from ..consumer import NOTIFIED
from .store import Outcome, Row

log = logging.getLogger(__name__)

BROKER_TIMEOUT = 15.0
# A record batch holds up to this much (each one a round trip), below the 1 MiB that brokers
# accept per batch by default.
BATCH_BYTES = 512 * 1024
# A row larger than this is failed before it is sent: the producer's request limit is 1 MiB.
ROW_BYTES_MAX = 1_000_000
# Refusals that are about the rows, not the connection: retrying cannot help.
_ROWS_REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
)
# Kafka's own key-to-partition rule (murmur2, as the Java client and kafkajs have it).
_PARTITIONER = DefaultPartitioner()


class Forwarder:
    def __init__(self, bootstrap: str, idempotent: bool) -> None:
        self._bootstrap = bootstrap
        self._idempotent = idempotent
        self._producer: AIOKafkaProducer | None = None
        # The stage runs two batches at once; both need the producer, and one is started.
        self._starting = asyncio.Lock()
        # Topics that refused a batch of several rows for its size: one row per batch.
        self._one_per_batch: set[str] = set()

    async def connect(self) -> AIOKafkaProducer:
        """The producer, started by whichever batch asks first."""
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    enable_idempotence=self._idempotent,
                    request_timeout_ms=10_000,
                    max_batch_size=BATCH_BYTES,
                )
                try:
                    await asyncio.wait_for(producer.start(), BROKER_TIMEOUT)
                except BaseException:
                    await _stop(producer)
                    raise
                self._producer = producer
            return self._producer

    async def send(self, rows: list[Row]) -> Outcome:
        producer = await self.connect()
        forwarded = Outcome()
        try:
            async with asyncio.timeout(BROKER_TIMEOUT):
                partitions = await self._partitions(producer, rows, forwarded)
                results = await asyncio.gather(
                    *(
                        self._send_partition(producer, topic, partition, part, forwarded)
                        for (topic, partition), part in partitions.items()
                    ),
                    return_exceptions=True,
                )
            forwarded.error = next((r for r in results if isinstance(r, BaseException)), None)
        except (KafkaError, TimeoutError) as exc:
            forwarded.error = exc
        if forwarded.error is not None:
            await self._drop(producer)
        return forwarded

    async def close(self) -> None:
        producer = self._producer
        if producer is not None:
            await self._drop(producer)

    async def _drop(self, producer: AIOKafkaProducer) -> None:
        async with self._starting:
            current = self._producer
            if current is None or current is not producer:
                return  # the other batch dropped it already
            self._producer = None
        await _stop(producer)

    async def _partitions(
        self, producer: AIOKafkaProducer, rows: list[Row], forwarded: Outcome
    ) -> dict[tuple[str, int], list[Row]]:
        """The rows by topic and partition, each list in ``id`` order."""
        known: dict[str, list[int] | None] = {}
        partitions: dict[tuple[str, int], list[Row]] = {}
        for row in rows:
            assert row.topic is not None  # the stage's rows all have one
            if row.topic not in known:
                try:
                    known[row.topic] = sorted(await producer.partitions_for(row.topic))
                except KafkaError as exc:
                    if exc.retriable:
                        raise
                    known[row.topic] = None  # refused: an invalid name, no authorization
                    log.warning("kafka refused topic %s: %r", row.topic, exc)
            numbers = known[row.topic]
            if numbers is None:
                forwarded.failures[row.id] = f"kafka refused the topic: {row.topic}"
                continue
            partition = _PARTITIONER(row.key.encode(), numbers, numbers)
            partitions.setdefault((row.topic, partition), []).append(row)
        return partitions

    async def _send_partition(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        rows: list[Row],
        forwarded: Outcome,
    ) -> None:
        alone = topic in self._one_per_batch
        batch = producer.create_batch()
        members: list[Row] = []
        for row in rows:
            headers = [("notify-event-id", row.event_id.encode())]
            if row.notified:
                headers.append((NOTIFIED, b"1"))
            key, value = row.key.encode(), row.payload.encode()
            size = len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)
            if size > ROW_BYTES_MAX:
                forwarded.failures[row.id] = f"too large for Kafka: {size} bytes"
                continue
            if members and alone:
                await self._send_batch(producer, batch, topic, partition, members, forwarded)
                batch, members = producer.create_batch(), []
            # A full batch refuses the row; an empty one takes any.
            while batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                await self._send_batch(producer, batch, topic, partition, members, forwarded)
                batch, members = producer.create_batch(), []
            members.append(row)
        if members:
            await self._send_batch(producer, batch, topic, partition, members, forwarded)

    async def _send_batch(
        self,
        producer: AIOKafkaProducer,
        batch: Any,
        topic: str,
        partition: int,
        members: list[Row],
        forwarded: Outcome,
    ) -> None:
        """Send one record batch and wait for Kafka's answer. A refusal stops the call (it
        broke an idempotent producer's sequence): a row refused alone is failed; a batch
        refused whole is sent again row by row."""
        try:
            await (await producer.send_batch(batch, topic, partition=partition))
        except _ROWS_REFUSED as exc:
            if len(members) == 1:
                forwarded.failures[members[0].id] = f"kafka refused the event: {exc!r}"
            elif topic not in self._one_per_batch:
                log.warning(
                    "topic %s refused a batch of %d rows (%r): one row per batch from now"
                    " on (its max.message.bytes is below %d)",
                    topic,
                    len(members),
                    exc,
                    BATCH_BYTES,
                )
                self._one_per_batch.add(topic)
            raise
        forwarded.done.extend(row.id for row in members)


async def _stop(producer: AIOKafkaProducer) -> None:
    """Stop a producer we are done with, within the broker timeout: its stop waits for the
    batches still queued, which a broker that is down never takes (and the caller may hold
    the lock every batch needs)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), BROKER_TIMEOUT)
