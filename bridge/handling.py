"""One domain event's way to its students, for the Kafka bridge and the outbox relay alike.

An event is parsed (:mod:`.envelope`), mapped by its rule (:mod:`.rules`), and its Redis
work done in one step for a whole batch: the backend cache keys first, then the publishes,
in order (:meth:`notify.publish.Publisher.invalidate_then_publish`). What cannot be handled
is set aside with a reason; what fails because Redis is not answering raises, and the
caller retries the batch: the dedupe keys make that safe.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import Counter, Histogram
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from notify import redis_client
from notify.config import HistorySettings, RedisSettings
from notify.incarnation import Durability
from notify.keys import Keys
from notify.publish import Notification, Publisher

from . import envelope, rules
from .rules import Outcome, Rule

# Attempts of an event whose Redis work Redis rejects for a reason of its own (not an
# outage) before it is set aside.
EVENT_ATTEMPTS = 3

# Redis errors that say nothing about the event: Redis is restarting, failing over, full
# or busy. The batch waits them out.
_OUTAGES = (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
_OUTAGE_PREFIXES = ("BUSY", "MASTERDOWN", "NOREPLICAS")


class EventMetrics(Protocol):
    """The counters of a process that handles events (bridge, outbox relay)."""

    published: Counter
    deduplicated: Counter
    unknown_type: Counter
    cache_keys_deleted: Counter
    event_age: Histogram


@dataclass(slots=True)
class Item:
    """One event on its way through a batch."""

    # The caller's handle: the Kafka record, the outbox row.
    origin: Any
    outcome: Outcome | None = None
    # Why it is set aside (parsing, or Redis rejecting its work); None while it is not.
    reason: str | None = None
    # Attempts Redis rejected its work so far.
    rejected: int = 0


class Rejected(Exception):
    """Redis rejected some events' work, not yet often enough to set them aside."""


def connect(
    redis: RedisSettings, history: HistorySettings
) -> tuple[redis_client.Client, Publisher]:
    """The Redis client and the publish contract, as both event sources (Kafka, the outbox)
    use them."""
    client = redis_client.client(redis.url, redis.cluster)
    return client, Publisher(client, Keys(redis.namespace), history, Durability(client))


def map_event(
    origin: Any,
    value: bytes | None,
    rule_set: Mapping[str, Rule],
    metrics: EventMetrics,
) -> Item:
    """Parse and map one event; an event without a rule is an item with nothing to do."""
    try:
        event = envelope.parse(value)
        rule = rule_set.get(event.event_type)
        if rule is None:
            metrics.unknown_type.inc()
            return Item(origin)
        return Item(origin, outcome=rules.apply(rule, event))
    except envelope.EnvelopeError as exc:
        return Item(origin, reason=str(exc))


async def publish(publisher: Publisher, items: Sequence[Item], metrics: EventMetrics) -> None:
    """All Redis work of the batch: its cache keys first, then its publishes, in order.

    A connection error raises and the whole batch is retried (the dedupe keys make that
    safe), and so does any error that says nothing about the event itself: OOM, READONLY
    after a failover, BUSY. An error about one event is final at once if it must recur
    (data that cannot be encoded, WRONGTYPE on its keys); any other gets EVENT_ATTEMPTS
    tries (Rejected until then). A final error sets the event aside with Redis's answer as
    the reason.
    """
    work = [item for item in items if item.outcome is not None]
    stale: list[str] = []
    sends: list[tuple[Item, Notification]] = []
    for item in work:
        assert item.outcome is not None
        stale.extend(item.outcome.cache_keys)
        sends.extend((item, notification) for notification in item.outcome.notifications)
    sent = await publisher.invalidate_then_publish(stale, [n for _, n in sends])
    for result in sent.results:
        if isinstance(result, Exception) and outage(result):
            raise result
    rejected = False
    now = datetime.now(UTC)
    # Counted once per batch: a labelled counter costs more than the rest of the loop.
    published: collections.Counter[str] = collections.Counter()
    duplicates = 0
    for (item, notification), result in zip(sends, sent.results, strict=True):
        if isinstance(result, TypeError):
            item.reason = f"data cannot be encoded as JSON: {result}"
        elif isinstance(result, Exception):
            item.rejected += 1
            if item.rejected >= EVENT_ATTEMPTS or str(result).startswith("WRONGTYPE"):
                item.reason = f"redis rejected the event's work: {result}"
            else:
                rejected = True
        elif result.duplicate:
            duplicates += 1
        else:
            published[notification.event] += 1
    metrics.deduplicated.inc(duplicates)
    for event, count in published.items():
        metrics.published.labels(event).inc(count)
    metrics.cache_keys_deleted.inc(len(stale))
    for item in work:
        assert item.outcome is not None
        occurred = item.outcome.occurred_at
        if occurred is not None and occurred.tzinfo is not None:
            metrics.event_age.observe(max(0.0, (now - occurred).total_seconds()))
    if rejected:
        raise Rejected("redis rejected an event's work; retrying the batch")


def outage(error: Exception) -> bool:
    """A Redis error that is not about the event it answered."""
    if isinstance(error, TypeError):
        return False
    if isinstance(error, ResponseError) and not isinstance(error, _OUTAGES):
        return str(error).startswith(_OUTAGE_PREFIXES)
    return True
