"""The Kafka side of the bridge: consume, map, publish through Redis, then commit.

Order of work for each batch from ``getmany``, the reason at-least-once holds:

1. every message is parsed and mapped by the rules; one that cannot be handled is sent to
   the dead-letter topic with the reason (and the send awaited);
2. the Redis work of the whole batch runs in one pipeline, per partition in Kafka order:
   backend cache keys are deleted *before* the notification goes out, so an app that
   refetches on the notification never reads the stale cache;
3. only then are the offsets committed.

A crash anywhere before 3 redelivers the batch, and the publish contract's dedupe (keyed by
``eventId`` per recipient) turns the redelivery into no second notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from .. import redis_client
from ..broker import Publisher
from ..config import BridgeSettings
from . import envelope, rules
from .rules import Outcome, Rule

log = logging.getLogger(__name__)

BATCH_MAX_RECORDS = 500
# aiokafka's default fetch wait is 500 ms: an idle stream would add that to every event.
FETCH_MAX_WAIT_MS = 10
BROKER_TIMEOUT = 15.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    reason: str


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # Let the batch in hand finish and commit, so the next owner starts after it.
        await self._bridge.idle.wait()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info(
            "partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
        )


class Bridge:
    def __init__(self, settings: BridgeSettings, rule_set: dict[str, Rule]) -> None:
        self._settings = settings
        self._rules = rule_set
        self._redis = redis_client.client(settings.redis_url)
        self._publisher = Publisher(self._redis, settings.history)
        self._consumer, self._producer = self._new_clients()
        self.idle = asyncio.Event()
        self.idle.set()

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
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap, acks="all", request_timeout_ms=10_000
        )
        return consumer, producer

    async def _start_clients(self, stop: asyncio.Event) -> None:
        """Start Kafka clients, retrying forever: an absent broker is an outage, not a crash."""
        backoff = BACKOFF_MIN
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._producer.start(), BROKER_TIMEOUT)
                self._consumer.subscribe(
                    list(self._settings.kafka.topics), listener=_CommitOnRevoke(self)
                )
                await asyncio.wait_for(self._consumer.start(), BROKER_TIMEOUT)
                log.info("bridge consuming %s", ",".join(self._settings.kafka.topics))
                return
            except (KafkaError, TimeoutError, OSError) as exc:
                log.warning("kafka unavailable (%s); retrying in %.1fs", exc, backoff)
                await self._stop_kafka()
                self._consumer, self._producer = self._new_clients()
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _handle(self, batch: dict[TopicPartition, list[object]], stop: asyncio.Event) -> None:
        outcomes: list[Outcome] = []
        dead: list[DeadLetter] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, messages in batch.items():
            for message in messages:
                self._map(message, outcomes, dead)
                offsets[tp] = message.offset + 1  # type: ignore[attr-defined]
        await self._retry("dead-letter send", stop, lambda: self._send_dead(dead))
        await self._retry("redis publish", stop, lambda: self._publish(outcomes))
        await self._commit(offsets)

    def _map(self, message: object, outcomes: list[Outcome], dead: list[DeadLetter]) -> None:
        value: bytes | None = message.value  # type: ignore[attr-defined]
        try:
            event = envelope.parse(value)
            rule = self._rules.get(event.event_type)
            if rule is None:
                log.debug("no rule for event type %s; skipped", event.event_type)
                return
            outcomes.append(rules.apply(rule, event))
        except envelope.EnvelopeError as exc:
            dead.append(
                DeadLetter(
                    topic=message.topic,  # type: ignore[attr-defined]
                    partition=message.partition,  # type: ignore[attr-defined]
                    offset=message.offset,  # type: ignore[attr-defined]
                    key=message.key,  # type: ignore[attr-defined]
                    value=value,
                    headers=tuple(message.headers or ()),  # type: ignore[attr-defined]
                    reason=str(exc),
                )
            )

    async def _send_dead(self, dead: list[DeadLetter]) -> None:
        for letter in dead:
            headers = [
                *letter.headers,
                ("notify-dlq-reason", letter.reason.encode()),
                ("notify-dlq-topic", letter.topic.encode()),
                ("notify-dlq-partition", str(letter.partition).encode()),
                ("notify-dlq-offset", str(letter.offset).encode()),
            ]
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self._settings.kafka.dlq_topic, letter.value, key=letter.key, headers=headers
                ),
                BROKER_TIMEOUT,
            )
            log.warning(
                "dead-lettered %s[%d]@%d: %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.reason,
            )

    async def _publish(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for outcome in outcomes:
                if outcome.cache_keys:
                    pipe.delete(*outcome.cache_keys)
                for notification in outcome.notifications:
                    await self._publisher.queue(notification, pipe)
            await pipe.execute()

    async def _retry(
        self, what: str, stop: asyncio.Event, step: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``step`` until it succeeds; the batch is not committed before it does."""
        backoff = BACKOFF_MIN
        failing = False
        while True:
            try:
                await step()
            except (RedisError, KafkaError, TimeoutError, OSError) as exc:
                if not failing:
                    log.warning("%s failed (%s); retrying until it succeeds", what, exc)
                    failing = True
                if stop.is_set():
                    raise
                await self._wait_paused(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                if failing:
                    log.info("%s recovered", what)
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
            log.warning("offset commit failed (%s); the batch will be redelivered", exc)

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
