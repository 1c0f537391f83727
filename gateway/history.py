"""Reading a student's history for resume and catch-up.

The decision is the heart of the "never silently stale" promise: either every event after
the client's position is still in the history, in order and without holes, or the client is
told to resync. There is no third outcome.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from notify import keys
from notify.protocol import EventId
from notify.redis_client import Client, text


@dataclass(frozen=True, slots=True)
class Replay:
    """What follows a client's position: the missed frames, or why they cannot be had."""

    frames: list[tuple[EventId, bytes]]
    last_id: EventId | None
    resync_reason: str | None = None


async def current(redis: Client, user: str) -> EventId | None:
    epoch, seq = await redis.hmget(keys.meta(user), ["epoch", "seq"])
    return _id(epoch, seq)


# KEYS: meta, history. ARGV: the XRANGE start. One atomic read of the sequence, the entries
# after the client's position, and whether this node is the one the history was written on
# (see the publish script in broker.py: a promoted replica may lack its last events).
_READ = """
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'replid')
local here = meta[3] == replid and 1 or 0
return {meta[1], meta[2], here, redis.call('XRANGE', KEYS[2], ARGV[1], '+')}
"""


async def after(redis: Client, user: str, position: EventId | None) -> Replay:
    """Every event after ``position`` (None: from the history's first event), or a resync."""
    after_seq = 0 if position is None else position.seq
    epoch, seq, here, entries = await redis.eval(
        _READ, 2, keys.meta(user), keys.history(user), f"(0-{after_seq}"
    )
    last = _id(epoch, seq)
    if last is None:
        # No history at all: fine for a client that has seen nothing, a loss for one that has.
        return Replay([], None, None if position is None else "history expired")
    if position is not None and (position.epoch != last.epoch or not here):
        # Not here: the history moved to another node since its last event (a failover or
        # a slot migration) and may have lost its newest events; the next publish starts
        # a new epoch anyway.
        return Replay([], last, "history epoch changed")
    if after_seq > last.seq:
        return Replay([], last, "unknown id")
    # Each entry: [id, ["f", frame]], as the script returns it.
    frames = [
        (EventId(last.epoch, int(entry_id.split(b"-")[1])), fields[1])
        for entry_id, fields in entries
    ]
    # The first missed event must directly follow the client's position, or some were
    # trimmed away; entries past ``last`` cannot appear inside one transaction.
    if after_seq < last.seq and (not frames or frames[0][0].seq != after_seq + 1):
        return Replay([], last, "history trimmed")
    return Replay(frames, last)


def _id(epoch: bytes | str | None, seq: bytes | str | None) -> EventId | None:
    if epoch is None or seq is None:
        return None
    return EventId(text(epoch), int(seq))


async def recent(redis: Client, user: str, limit: int) -> list[bytes]:
    """The student's last ``limit`` event frames, oldest first (for diagnosis)."""
    entries: list[Any] = await redis.xrevrange(keys.history(user), count=limit) or []
    return [fields[b"f"] for _entry_id, fields in reversed(entries)]


class HistoryReader:
    """The history reads of one gateway process (resumes and catch-ups), bounded.

    Shared by every session of the process: after a Pub/Sub outage all of them catch up at
    once, and unbounded that would open a Redis connection each.
    """

    def __init__(self, redis: Client, concurrency: int) -> None:
        self._redis = redis
        self._reads = asyncio.Semaphore(concurrency)

    async def current(self, user: str) -> EventId | None:
        async with self._reads:
            return await current(self._redis, user)

    async def after(self, user: str, position: EventId | None) -> Replay:
        async with self._reads:
            return await after(self._redis, user, position)
