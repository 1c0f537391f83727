"""The publish contract every producer uses: bridge, HTTP API and CLI alike.

One Redis function (``notify_publish`` in library.lua) does, atomically for a batch of
notifications: skip a notification whose dedupe key was already published (returning the
original id) or whose Kafka offset was, settle which history incarnation (epoch) is
current for each student (:mod:`.incarnation`), append the event's body to the student's
bounded history (a list, whose length numbers the event), SPUBLISH the finished frame on
the student's channel, and write back only what must outlive the call. Because history
and live delivery come from a single step, a gateway that reads history after subscribing
can never see a hole between them.

What a call costs Redis is paid once per call (the node's identity, the time, one MGET of
everything it reads: every student's incarnation and every dedupe key), once per student in
it (once an hour, the expiries; the trim of a full history), or once per notification (RPUSH
and SPUBLISH, and a SET for a caller's dedupe key): docs/performance.md has what that is
against a plain PUBLISH.

The channel is a shard channel (SPUBLISH, Redis >= 7) on a single node and in a cluster
alike: in a cluster it then goes only to the nodes of its slot's shard, where the
student's history already lives, instead of being broadcast over the whole cluster bus.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from . import incarnation, library
from .config import HistorySettings
from .incarnation import Durability
from .keys import Keys
from .protocol import EventId, event_body, parse_event_id
from .redis_client import Client, text

# A call with a notification without a dedupe key leaves a marker, remembered this long:
# redis-py re-sends a command whose reply was lost with the connection (it may have run),
# and within this window such a resent call answers what it answered the first time
# instead of publishing twice.
RETRY_WINDOW = 60


# Not frozen, nor Published: the bridge builds one of each per recipient of every event it
# reads, and a frozen dataclass costs twice as much to build. Nothing changes one once built.
@dataclass(slots=True)
class Notification:
    """One event for one user, as producers hand it to the publish contract."""

    user_id: str
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    invalidate: tuple[str, ...] = ()
    # An event id or idempotency key: a second publish with the same key for the same user
    # within the dedupe window returns the first id and delivers nothing.
    dedupe_key: str | None = None


@dataclass(slots=True)
class Published:
    id: EventId
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Sent:
    """What :meth:`Publisher.invalidate_then_publish` did, in the order it was asked."""

    # Per cache key: 1 if it existed (and is now deleted), 0 if it was already gone.
    deleted: list[int]
    # Per notification: its id, or why it was not published. A TypeError: its data cannot
    # be encoded (found before anything was sent). A ResponseError, or in a cluster a
    # node's connection error: what Redis answered for it.
    results: list[Published | Exception]


class Publisher:
    def __init__(
        self, redis: Client, keys: Keys, history: HistorySettings, durability: Durability
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._history = history
        self._durability = durability
        self._cluster = isinstance(redis, RedisCluster)

    async def publish(self, notification: Notification) -> Published:
        """Publish one notification; raises what stopped it."""
        [result] = (await self.invalidate_then_publish((), [notification])).results
        if isinstance(result, Exception):
            raise result
        return result

    async def invalidate_then_publish(
        self, cache_keys: Sequence[str], notifications: Sequence[Notification]
    ) -> Sent:
        """Delete the backend's cache keys, then publish: the order every producer keeps.

        An app refetches when the notification arrives, so the push must never overtake
        the DEL of the cache it will read. Two steps, not one pipeline: a cluster runs each
        node's share of a pipeline concurrently, so the push could overtake a DEL.

        The notifications go out in as few function calls as there are slots among their
        students in a cluster (one on a single Redis), each atomic, at most CALL_SIZE
        notifications each, a student's in order. A failure of either step as a whole
        (Redis unreachable) raises; nothing was published if the first step raised.
        """
        deleted: list[int] = []
        if cache_keys:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in cache_keys:  # one DEL per key: in a cluster they may sit in any slot
                    pipe.delete(key)
                deleted = list(await pipe.execute())
        results: list[Published | Exception | None] = [None] * len(notifications)
        calls = self._calls(notifications, await self._durability.flag(), results)
        for call, reply in zip(calls, await self._run(calls), strict=True):
            outcomes = _outcomes(reply, len(call.indices))
            for index, outcome in zip(call.indices, outcomes, strict=True):
                results[index] = outcome
        return Sent(deleted, [r for r in results if r is not None])

    def _calls(
        self,
        notifications: Sequence[Notification],
        durable: str,
        results: list[Published | Exception | None],
    ) -> list[_Call]:
        """The function calls that publish ``notifications``; an unencodable one gets its
        TypeError in ``results`` instead (found before anything is sent)."""
        keys, history = self._keys, self._history
        now = time.time_ns() // 1_000_000
        # The function takes a student's notifications together, in order.
        students: dict[str, list[tuple[int, bytes]]] = {}
        for index, notification in enumerate(notifications):
            try:
                body = event_body(
                    notification.event, notification.data, list(notification.invalidate), now
                )
            except TypeError as exc:  # orjson: nesting too deep, non-string keys
                results[index] = exc
                continue
            students.setdefault(notification.user_id, []).append((index, body))
        groups: dict[int, _Call] = {}
        calls: list[_Call] = []
        for user, items in students.items():
            incarnation_key = keys.incarnation(user)
            group = key_slot(incarnation_key.encode()) if self._cluster else 0
            previous = None
            for index, body in items:
                call = groups.get(group)
                if call is None or len(call.indices) == CALL_SIZE:
                    # The call's retry marker sits in its first student's slot, like the rest.
                    marker = keys.dedupe(user, f"call:{secrets.token_hex(8)}")
                    call = groups[group] = _Call(
                        [],
                        [marker],
                        [incarnation.new_epoch(), durable, history.size, history.ttl,
                         history.position_ttl, history.dedupe_ttl, 0],
                    )  # fmt: skip
                    calls.append(call)
                channel = ""
                if call is not previous:
                    call.keys += [incarnation_key, keys.history(user)]
                    channel, previous = keys.channel(user), call
                self._add(call, index, notifications[index], channel, body)
        return calls

    def _add(self, call: _Call, index: int, notification: Notification, channel: str,
             body: bytes) -> None:  # fmt: skip
        """Add one notification to ``call``, after its student's keys (if ``channel``)."""
        keys, user = self._keys, notification.user_id
        call.indices.append(index)
        if notification.dedupe_key is None:
            deduped = ""
            call.args[6] = RETRY_WINDOW  # the marker answers a resent call
        else:
            deduped = "1"
            call.keys.append(keys.dedupe(user, notification.dedupe_key))
        call.args += [channel, body, deduped]

    async def _run(self, calls: list[_Call]) -> list[Any]:
        """Each call's reply, or the exception that failed it as a whole."""
        if len(calls) == 1:
            [call] = calls
            try:
                return [await library.call(self._redis, library.PUBLISH, call.keys, call.args)]
            except ResponseError as exc:  # about the call (OOM, READONLY): its results
                return [exc]
        replies = await self._pipeline(calls)
        if any(isinstance(reply, Exception) and library.missing(reply) for reply in replies):
            # A node without this version of the library: those calls did nothing.
            await library.load(self._redis)
            replies = await self._pipeline(calls)
        return replies

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.fcall(library.PUBLISH, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))


# Notifications per function call at most: a call is one atomic step, and a larger one
# would hold Redis for longer (about 12 ms at this size). The API's largest batch, so that
# one request on a single Redis is one call, published whole or not at all.
CALL_SIZE = 1000


@dataclass(slots=True)
class _Call:
    """One function call: which notifications it publishes, its keys and arguments."""

    indices: list[int]
    keys: list[str]
    args: list[Any]


def _outcomes(reply: Any, count: int) -> list[Published | Exception]:
    """Per notification, what one call's reply says of it."""
    if isinstance(reply, Exception):
        return [reply] * count
    outcomes: list[Published | Exception] = []
    # Flat: id (or Redis's error) and flag, per notification.
    for raw_id, flag in zip(reply[::2], reply[1::2], strict=True):
        if int(flag) == 2:
            outcomes.append(ResponseError(text(raw_id)))
        else:
            outcomes.append(parse_result((raw_id, flag)))
    return outcomes


def parse_result(raw: Sequence[Any]) -> Published:
    event_id = parse_event_id(text(raw[0]))
    if event_id is None:
        raise ValueError(f"the publish function returned a malformed id: {raw[0]!r}")
    return Published(event_id, duplicate=int(raw[1]) == 0)
