"""Reading a student's history for resume and catch-up.

The decision is the heart of the "never silently stale" promise: either every event after
the client's position is still in the history, in order and without holes, or the client is
told to resync. There is no third outcome.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from notify import incarnation
from notify.config import HistorySettings
from notify.incarnation import Durability
from notify.keys import Keys
from notify.protocol import EventId
from notify.redis_client import Client, text


@dataclass(frozen=True, slots=True)
class Replay:
    """What follows a client's position: the missed frames, or why they cannot be had."""

    frames: list[tuple[EventId, bytes]]
    # The position after the frames (or the one a resync hands out): always set, since a
    # student without events has one too (``<epoch>-0``).
    last_id: EventId
    resync_reason: str | None = None


# KEYS: meta, history. ARGV: candidate epoch, durable flag, position ttl, then the client's
# position (epoch, seq) if it has one. One atomic step: settle the incarnation (a read may
# start the new one, so that the resync it answers hands out a position in it), then only
# for a position the history can continue, the entries after it.
_READ = (
    incarnation.LUA
    + """
local epoch, seq, outcome = incarnation(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local after = tonumber(ARGV[5])
if not after or outcome ~= 0 or ARGV[4] ~= epoch or after >= seq then
  return {epoch, seq, outcome, {}}
end
local entries = redis.call('XRANGE', KEYS[2], '(0-' .. after, '+', 'COUNT', seq - after)
return {epoch, seq, outcome, entries}
"""
)


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
    epoch, seq, outcome, entries = await redis.eval(
        _READ, 2, keys.meta(user), keys.history(user), *args
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
    # Each entry: [id, ["f", frame]], as the script returns it.
    frames = [
        (EventId(last.epoch, int(entry_id.split(b"-")[1])), fields[1])
        for entry_id, fields in entries
    ]
    if position.seq < last.seq:
        # The first missed event must directly follow the client's position, or some were
        # trimmed away; entries past ``last`` cannot appear inside one transaction.
        if not frames:
            return Replay([], last, "history expired")
        if frames[0][0].seq != position.seq + 1:
            return Replay([], last, "history trimmed")
    return Replay(frames, last)


async def recent(redis: Client, keys: Keys, user: str, limit: int) -> list[bytes]:
    """The student's last ``limit`` event frames, oldest first (for diagnosis)."""
    entries: list[Any] = await redis.xrevrange(keys.history(user), count=limit) or []
    return [fields[b"f"] for _entry_id, fields in reversed(entries)]


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
