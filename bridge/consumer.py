"""The Kafka side of the bridge: consume, map, publish through Redis, then commit.

Order of work for each batch from ``getmany``, the reason at-least-once holds:

1. a message its partition's mark covers is a replay and is skipped (:mod:`.positions`);
   every other is parsed and mapped by the rules;
2. the Redis work of the batch: backend cache keys are deleted *before* the notifications
   go out, so an app that refetches on the notification never reads the stale cache; the
   notifications follow in Kafka order per partition;
3. a message that cannot be handled is sent to the dead-letter topic with the reason (and
   the send awaited);
4. the partitions' marks are moved past the batch, and only then are the offsets committed.

A crash anywhere before 4 redelivers the batch, and the publish contract's dedupe (keyed by
``eventId`` per recipient) turns the redelivery into no second notification. A replay that
comes after the dedupe window (a new consumer group, an offset reset) is recognised by its
partition's mark instead.

No message can stall the stream: one whose Redis work fails for a reason of its own is set
aside after a few attempts, and one too large to be dead-lettered whole is dead-lettered as
a truncated copy that says where the original is. Only an outage (Redis or Kafka not
answering) holds the stream, for as long as it lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from notify import redis_client
from notify.config import BridgeSettings
from notify.keys import Keys

from . import handling, positions
from .handling import Item, Rejected
from .metrics import BridgeMetrics
from .positions import Mark, Positions
from .rules import Rule

log = logging.getLogger(__name__)

# Each batch costs a fetch, a function call per 1,000 notifications and a commit round
# trip whatever its size: 2000 rather than 500 took a backlog drain from 15.1k to 16.2k
# events/s (bench/run.py, when each notification was a script call of its own).
BATCH_MAX_RECORDS = 2000
# aiokafka's default fetch wait is 500 ms: an idle stream would add that to every event.
FETCH_MAX_WAIT_MS = 10
BROKER_TIMEOUT = 15.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
# A rebalance waits this long for the batch in hand; past it the rebalance goes on and the
# batch's partitions are left uncommitted for their next owner (who deduplicates).
REVOKE_WAIT = 30.0
# The outbox relay's header on an event whose students it notified before forwarding it.
NOTIFIED = "notify-notified"
# A dead letter that cannot be sent whole carries this much of the original value.
TRUNCATED_BYTES = 16_384


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # Let the batch in hand finish and commit, so the next owner starts after it.
        try:
            await asyncio.wait_for(self._bridge.idle.wait(), REVOKE_WAIT)
        except TimeoutError:
            log.warning("rebalance went on while a batch was still being retried")

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._bridge.positions.forget()
        log.info(
            "partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
        )


class Bridge:
    def __init__(self, settings: BridgeSettings, rule_set: dict[str, Rule]) -> None:
        self._settings = settings
        self._rules = rule_set
        self._redis, self._publisher = handling.connect(settings.redis, settings.history)
        self.positions = Positions(
            self._redis, Keys(settings.redis.namespace), settings.history.position_ttl
        )
        self._consumer, self._producer = self._new_clients()
        self.metrics = BridgeMetrics()
        self.idle = asyncio.Event()
        self.idle.set()
        self._started = False
        # What is failing right now ("redis publish", ...), or None: the readiness signal.
        self._failing: str | None = None

    @property
    def ready(self) -> bool:
        return self._started and self._failing is None

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def run(self, stop: asyncio.Event) -> None:
        await self._start_clients(stop)
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=500, max_records=BATCH_MAX_RECORDS)
                if not batch:
                    continue
                self.idle.clear()
                try:
                    await self._handle(batch, stop)
                finally:
                    self.idle.set()
        finally:
            await self._close()

    def _new_clients(self) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
        kafka = self._settings.kafka
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap,
            group_id=kafka.group,
            enable_auto_commit=False,
            auto_offset_reset=kafka.offset_reset,
            # A transactional producer's aborted writes never happened: never notify them.
            isolation_level="read_committed",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap, acks="all", request_timeout_ms=10_000
        )
        return consumer, producer

    async def _start_clients(self, stop: asyncio.Event) -> None:
        """Start Kafka clients, retrying forever: an absent broker is an outage, not a crash."""
        backoff = BACKOFF_MIN
        attempts = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._producer.start(), BROKER_TIMEOUT)
                await asyncio.wait_for(self._consumer.start(), BROKER_TIMEOUT)
                # Subscribed once started: subscribed before, start() also waits for the
                # group's assignment, which after a crash takes the dead member's session
                # timeout and a rebalance. That wait is not Kafka being down (giving up on
                # it would join again: a rebalance more for every member); getmany waits.
                self._consumer.subscribe(
                    list(self._settings.kafka.topics), listener=_CommitOnRevoke(self)
                )
                log.info("bridge consuming %s", ",".join(self._settings.kafka.topics))
                self._started = True
                await self._check_retention()
                return
            except (KafkaError, TimeoutError, OSError) as exc:
                # Logged once per outage, not once per attempt.
                attempts += 1
                if attempts == 1:
                    log.warning("kafka unavailable (%r); retrying until it answers", exc)
                await self._stop_kafka()
                self._consumer, self._producer = self._new_clients()
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _handle(self, batch: dict[TopicPartition, list[Any]], stop: asyncio.Event) -> None:
        known: dict[TopicPartition, Mark | None] = {}

        async def load() -> None:
            known.update(await self.positions.load(batch))

        await self._retry("redis positions", stop, load)
        items: list[Item] = []
        offsets: dict[TopicPartition, int] = {}
        moved: dict[TopicPartition, Mark] = {}
        for tp, messages in batch.items():
            self.metrics.consumed.labels(tp.topic).inc(len(messages))
            replays, mark = positions.split(known[tp], messages)
            self.metrics.deduplicated.inc(replays)  # handled before
            if mark is not None:
                moved[tp] = mark
            items.extend(self._map(message) for message in messages[replays:])
            offsets[tp] = messages[-1].offset + 1
        publish = functools.partial(handling.publish, self._publisher, items, self.metrics)
        await self._retry("redis publish", stop, publish)
        dead = [item for item in items if item.reason is not None]
        await self._retry("dead-letter send", stop, lambda: self._send_dead(dead))
        await self._retry("redis positions", stop, lambda: self.positions.save(moved))
        await self._commit(offsets)

    async def _check_retention(self) -> None:
        """Warn when a topic keeps messages longer than the contract keeps Kafka positions.

        A replay reaching further back (a new consumer group, an offset reset) would then
        notify the oldest messages' students a second time.
        """
        keep_ms = self._settings.history.position_ttl * 1000
        admin = AIOKafkaAdminClient(bootstrap_servers=self._settings.kafka.bootstrap)
        try:
            await asyncio.wait_for(admin.start(), BROKER_TIMEOUT)
            resources = [
                ConfigResource(ConfigResourceType.TOPIC, topic, {"retention.ms": None})
                for topic in self._settings.kafka.topics
            ]
            responses = await asyncio.wait_for(admin.describe_configs(resources), BROKER_TIMEOUT)
            for response in responses:
                for _code, _message, _type, topic, entries in response.resources:
                    for name, value, *_ in entries:
                        if name == "retention.ms" and value and not 0 <= int(value) <= keep_ms:
                            log.warning(
                                "topic %s keeps messages for %s ms, longer than "
                                "NOTIFY_POSITION_TTL (%d s): a replay of older messages "
                                "would notify them again",
                                topic,
                                value,
                                keep_ms // 1000,
                            )
        except Exception as exc:  # a broker without DescribeConfigs: nothing to compare
            log.info("could not read the topics' retention.ms: %r", exc)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    def _map(self, message: Any) -> Item:
        if (NOTIFIED, b"1") in (message.headers or ()):
            # Forwarded by the outbox relay after it notified the students itself: however
            # late this copy comes (Kafka down for days), it must not notify them again.
            self.metrics.deduplicated.inc()
            return Item(message)
        return handling.map_event(message, message.value, self._rules, self.metrics)

    async def _send_dead(self, dead: list[Item]) -> None:
        for item in dead:
            message, reason = item.origin, item.reason or ""
            headers = [
                *(message.headers or ()),
                ("notify-dlq-reason", reason.encode()),
                ("notify-dlq-topic", message.topic.encode()),
                ("notify-dlq-partition", str(message.partition).encode()),
                ("notify-dlq-offset", str(message.offset).encode()),
            ]
            value: bytes | None = message.value
            try:
                await self._dead_letter(value, message.key, headers)
            except KafkaError as exc:
                if exc.retriable:
                    raise
                # Refused for good (too large for the producer or the topic): a truncated
                # copy still says what failed and where the original is, and the stream
                # goes on. An empty one if even that is refused.
                size = len(value or b"")
                log.warning(
                    "dead letter of %s[%d]@%d (%d bytes) refused (%r); sending it truncated",
                    message.topic,
                    message.partition,
                    message.offset,
                    size,
                    exc,
                )
                headers.append(("notify-dlq-truncated", str(size).encode()))
                try:
                    await self._dead_letter((value or b"")[:TRUNCATED_BYTES], None, headers)
                except KafkaError as again:
                    if again.retriable:
                        raise
                    await self._dead_letter(None, None, headers)
                self.metrics.dead_letters_truncated.inc()
            self.metrics.dead_lettered.labels(message.topic).inc()
            log.warning(
                "dead-lettered %s[%d]@%d: %s",
                message.topic,
                message.partition,
                message.offset,
                reason,
            )

    async def _dead_letter(self, value: bytes | None, key: bytes | None, headers: Any) -> None:
        await asyncio.wait_for(
            self._producer.send_and_wait(
                self._settings.kafka.dlq_topic, value, key=key, headers=headers
            ),
            BROKER_TIMEOUT,
        )

    async def _retry(
        self, what: str, stop: asyncio.Event, step: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``step`` until it succeeds; the batch is not committed before it does."""
        backoff = BACKOFF_MIN
        failing = False
        while True:
            try:
                await step()
            except (*redis_client.UNAVAILABLE, KafkaError, TimeoutError, Rejected) as exc:
                if not failing:
                    log.warning("%s failed (%s); retrying until it succeeds", what, exc)
                    failing = True
                    self._failing = what
                if stop.is_set():
                    raise
                await self._wait_paused(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                if failing:
                    log.info("%s recovered", what)
                    self._failing = None
                    self._consumer.resume(*self._consumer.paused())
                return

    async def _wait_paused(self, seconds: float) -> None:
        """Wait with every partition paused, still polling so the group keeps this member.

        A partition assigned during the wait is not paused yet and may return records; they
        are put back (seek to the first one) so nothing is skipped.
        """
        self._consumer.pause(*self._consumer.assignment())
        fetched = await self._consumer.getmany(timeout_ms=int(seconds * 1000))
        for tp, messages in fetched.items():
            self._consumer.seek(tp, messages[0].offset)
            self._consumer.pause(tp)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        owned = self._consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in owned}
        if not mine:
            return
        try:
            await asyncio.wait_for(self._consumer.commit(mine), BROKER_TIMEOUT)
        except (KafkaError, TimeoutError) as exc:
            # Handled but uncommitted: redelivered later and deduplicated, never lost.
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); the batch will be redelivered", exc)
            return
        for tp, offset in mine.items():
            end = self._consumer.highwater(tp)
            if end is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - offset))

    async def _stop_kafka(self) -> None:
        for client in (self._consumer, self._producer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), BROKER_TIMEOUT)

    async def _close(self) -> None:
        await self._stop_kafka()
        await self._redis.aclose()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
