"""Reading a student's history for resume and catch-up.

The decision is the heart of the "never silently stale" promise: either every event after
the client's position is still in the history, in order and without holes, or the client is
told to resync. There is no third outcome.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from notify import incarnation, library
from notify.config import HistorySettings
from notify.incarnation import Durability
from notify.keys import Keys
from notify.protocol import EventId, event_frame
from notify.redis_client import Client, text


@dataclass(frozen=True, slots=True)
class Replay:
    """What follows a client's position: the missed frames, or why they cannot be had."""

    frames: list[tuple[EventId, bytes]]
    # The position after the frames (or the one a resync hands out): always set, since a
    # student without events has one too (``<epoch>-0``).
    last_id: EventId
    resync_reason: str | None = None


async def after(
    redis: Client, keys: Keys, durable: str, user: str, position: EventId | None, ttl: int
) -> Replay:
    """Every event after ``position``, or why not; None: the current position, no events.

    The position returned is always in the current incarnation: a client that stores it
    resumes from there, and never gets the same resync twice.
    """
    args: list[str | int] = [incarnation.new_epoch(), durable, ttl]
    if position is not None:
        args += [position.epoch, position.seq]
    epoch, seq, outcome, first, bodies = await library.call(
        redis, library.READ, [keys.incarnation(user), keys.history(user)], args
    )
    last = EventId(text(epoch), int(seq))
    if position is None:
        return Replay([], last)
    if outcome == incarnation.CREATED:
        return Replay([], last, "history expired")
    if outcome == incarnation.ENDED or position.epoch != last.epoch:
        return Replay([], last, "history epoch changed")
    if position.seq > last.seq:
        return Replay([], last, "unknown id")
    frames = _frames(last.epoch, first, bodies)
    if position.seq < last.seq:
        # The first missed event must directly follow the client's position, or some were
        # trimmed away; entries past ``last`` cannot appear inside one transaction.
        if not frames:
            return Replay([], last, "history expired")
        if frames[0][0].seq != position.seq + 1:
            return Replay([], last, "history trimmed")
    return Replay(frames, last)


def _frames(epoch: str, first: int, bodies: list[bytes]) -> list[tuple[EventId, bytes]]:
    """History entries as event frames, numbered from ``first``. The history keeps only
    bodies: an event's number is known once it is appended, and its epoch lives in the
    incarnation key."""
    ids = [EventId(epoch, n) for n in range(first, first + len(bodies))]
    return [(i, event_frame(i, body)) for i, body in zip(ids, bodies, strict=True)]


async def recent(redis: Client, keys: Keys, user: str, limit: int) -> list[bytes]:
    """The student's last ``limit`` event frames, oldest first (for diagnosis)."""
    reply = await library.call(
        redis, library.RECENT, [keys.incarnation(user), keys.history(user)], [limit]
    )
    if not reply:
        return []
    epoch, first, bodies = reply
    return [frame for _id, frame in _frames(text(epoch), first, bodies)]


class HistoryReader:
    """The history reads of one gateway process (resumes and catch-ups), bounded.

    Shared by every session of the process: after a Pub/Sub outage all of them catch up at
    once, and unbounded that would open a Redis connection each.
    """

    def __init__(
        self,
        redis: Client,
        keys: Keys,
        durability: Durability,
        history: HistorySettings,
        concurrency: int,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._durability = durability
        self._ttl = history.position_ttl
        self._reads = asyncio.Semaphore(concurrency)

    async def after(self, user: str, position: EventId | None) -> Replay:
        async with self._reads:
            durable = await self._durability.flag()
            return await after(self._redis, self._keys, durable, user, position, self._ttl)
