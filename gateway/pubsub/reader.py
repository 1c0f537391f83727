"""The process's Pub/Sub reader: one shard per primary, channels routed by hash slot.

Notifications travel on shard channels (SSUBSCRIBE/SPUBLISH, Redis >= 7). In a Redis
Cluster a shard channel is served only by the nodes of its slot's shard, so the reader keeps
one connection per primary (:class:`.wire.Shard`) and routes each student's channel by its
hash slot; a single node is the same thing with one shard that owns every slot.

When a cluster changes under a shard (a failover, a slot migration) the node unsubscribes
the channels it no longer serves (an unsolicited SUNSUBSCRIBE), answers MOVED to a new
SSUBSCRIBE, or drops the connection. Each of these is a gap: the listener holds the live
frames of those channels, the reader re-reads the slot map, subscribes each channel where it
now lives, and once Redis confirms it the listener catches up from history, which lives in
the channel's slot and so moved with it.

A connection can also look healthy while delivering nothing (a half-open TCP connection, a
subscription lost on the server side). So the process publishes to a probe channel of each
shard every second, through its ordinary Redis client, and expects to read it back; when a
shard's probe stops arriving the process reports not ready and replaces that connection,
which triggers the same catch-up as any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from redis.asyncio import RedisCluster
from redis.asyncio.connection import parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from notify.keys import Keys
from notify.redis_client import Client

from .listener import PubSubListener
from .wire import BACKOFF_MAX, BACKOFF_MIN, PROBE_DEADLINE, PROBE_INTERVAL, Address, Moved, Shard

log = logging.getLogger(__name__)

# A cluster's slot map is re-read this often, and as soon as a shard reports trouble.
TOPOLOGY_INTERVAL = 5.0

SlotMap = list[tuple[int, int, Address]]


class Reader:
    """Routes each channel to the shard that serves its slot, and follows the slot map."""

    def __init__(self, redis: Client, redis_url: str, keys: Keys, process_id: str) -> None:
        self._redis = redis
        self._keys = keys
        self._options: dict[str, Any] = dict(parse_url(redis_url))
        self._process = process_id
        self._listener: PubSubListener | None = None
        self._shards: dict[Address, Shard] = {}
        self._map: SlotMap = []
        self._owners: list[Address] = []
        # Channels displaced from their shard, waiting for the next slot map.
        self._homeless: set[str] = set()
        self._refresh = asyncio.Event()
        self._mapped = asyncio.Event()
        self.connected = asyncio.Event()
        self._map_logged = False

    def attach(self, listener: PubSubListener) -> None:
        """Register who hears the messages, gaps and catch-ups; before :meth:`run`."""
        self._listener = listener

    @property
    def delivering(self) -> bool:
        """Every shard connected, and its probe back recently: the readiness signal."""
        return bool(self._shards) and all(s.delivering for s in self._shards.values())

    async def subscribe(self, channel: str) -> None:
        """Subscribe ``channel`` (if not already) and wait until Redis confirmed it."""
        await self._mapped.wait()
        while True:
            shard = self._shards.get(self._owner(channel))
            if shard is None:  # its slot has no primary right now (a cluster failing over)
                await asyncio.sleep(BACKOFF_MIN)
                continue
            with contextlib.suppress(Moved):  # moved while waiting: route it again
                await shard.subscribe(channel)
                return

    def unsubscribe(self, channel: str) -> None:
        self._homeless.discard(channel)
        shard = self._shards.get(self._owner(channel)) if self._owners else None
        if shard is not None:
            shard.unsubscribe(channel)

    async def run(self) -> None:
        """Follow the slot map and run one connection per primary; cancel to stop."""
        backoff = BACKOFF_MIN
        try:
            while True:
                try:
                    self._apply(await self._slot_map())
                    backoff = BACKOFF_MIN
                except Exception as exc:  # any failure: this loop must never end
                    if not self._map_logged:
                        log.warning("cluster slot map unavailable (%s); retrying", exc)
                        self._map_logged = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                self._map_logged = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TOPOLOGY_INTERVAL):
                        await self._refresh.wait()
                self._refresh.clear()
                # A failover shows up as several reports at once: read the map once for all.
                await asyncio.sleep(BACKOFF_MIN)
        finally:
            self.close()

    async def _slot_map(self) -> SlotMap:
        if not isinstance(self._redis, RedisCluster):
            return [(0, REDIS_CLUSTER_HASH_SLOTS - 1, None)]
        async with asyncio.timeout(PROBE_DEADLINE):
            # Parsed by redis-py: (start, end) -> {"primary": (host, port), ...}
            slots = cast(dict[tuple[int, int], Any], await self._redis.cluster_slots())
        return [(start, end, tuple(shard["primary"])) for (start, end), shard in slots.items()]

    def _apply(self, slot_map: SlotMap) -> None:
        if slot_map == self._map and not self._homeless:
            return  # the usual case: nothing moved, no channel to re-check
        listener = self._listener
        assert listener is not None, "attach a listener before running the reader"
        self._map = slot_map
        owners: list[Address] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for start, end, address in slot_map:
            owners[start : end + 1] = [address] * (end - start + 1)
        self._owners = owners
        primaries = {address for _, _, address in slot_map}
        for address in primaries - self._shards.keys():
            shard = Shard(address, self._probe_for(address), self._options, self, listener)
            shard.task = asyncio.create_task(shard.run())
            self._shards[address] = shard
        moved = set(self._homeless)
        self._homeless.clear()
        for shard in self._shards.values():
            for channel in [c for c in shard.protocol.wanted if self._owner(c) != shard.address]:
                shard.release(channel)
                moved.add(channel)
            probe = shard.protocol.probe_channel
            if shard.address in primaries and self._owner(probe) != shard.address:
                shard.move_probe(self._probe_for(shard.address))
        for address in self._shards.keys() - primaries:
            self._shards.pop(address).close()
        if moved:
            listener.hold(moved)
            for channel in moved:
                if (owner := self._shards.get(self._owner(channel))) is not None:
                    owner.adopt(channel)
                else:
                    self._homeless.add(channel)
        self._mapped.set()
        self.shard_changed()

    def _owner(self, channel: str) -> Address:
        return self._owners[key_slot(channel.encode())]

    def _probe_for(self, address: Address) -> str:
        """A probe channel of this process whose slot ``address`` serves."""
        tag = 0
        while self._owner(channel := self._keys.probe(self._process, tag)) != address:
            tag += 1
        return channel

    async def probe(self) -> None:
        """Publish to every shard's probe channel forever; cancel to stop.

        All at once and each within the interval: one unreachable node must not hold up
        the probes of the healthy ones, which would then look silent and be replaced.
        """
        while True:
            shards = list(self._shards.values())
            await asyncio.gather(*(self._probe(shard) for shard in shards))
            await asyncio.sleep(PROBE_INTERVAL)

    async def _probe(self, shard: Shard) -> None:
        # A probe that fails is what the shard's deadline detects: nothing to handle here.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(PROBE_INTERVAL):
                await self._redis.spublish(shard.protocol.probe_channel, b"")

    # Topology: what the shards report

    def displaced(self, channel: str) -> None:
        self._homeless.add(channel)
        if self._listener is not None:
            self._listener.hold([channel])
        self.refresh()

    def refresh(self) -> None:
        self._refresh.set()

    def shard_changed(self) -> None:
        if self._shards and all(s.connected for s in self._shards.values()):
            self.connected.set()
        else:
            self.connected.clear()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
