"""The process's sharded Pub/Sub connections, and the probes that prove they deliver.

Notifications travel on shard channels (SSUBSCRIBE/SPUBLISH, Redis >= 7). In a Redis
Cluster a shard channel is served only by the nodes of its slot's shard, so the reader keeps
one connection per primary and routes each student's channel by its hash slot; a single
node is the same thing with one shard that owns every slot.

Written as asyncio protocols with hiredis parsing rather than on redis-py's PubSub helper,
for two reasons. Reconnection is explicit: a dropped connection means frames were published
that this process never saw, and the hub must hold the live stream of every student on
that shard and refill it from history once the subscriptions are confirmed again; a helper
that silently reconnects would hide that gap. And every message in a chunk read from the
socket is dispatched in one synchronous pass, without an await per message, which under
load was the largest cost of the process after the socket writes themselves.

When a cluster changes under a shard (a failover, a slot migration) the node unsubscribes
the channels it no longer serves (an unsolicited SUNSUBSCRIBE), answers MOVED to a new
SSUBSCRIBE, or drops the connection. Each of these is a gap: the students' connections hold
live frames, the reader re-reads the slot map, subscribes each channel where it now lives,
and once Redis confirms it they catch up from history, which lives in the channel's slot
and so moved with it.

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
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, cast

import hiredis
from redis.asyncio import RedisCluster
from redis.asyncio.connection import (
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.crc import key_slot

from ..redis_client import UNAVAILABLE, Client

log = logging.getLogger(__name__)

_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
PROBE_INTERVAL = 1.0
# No probe read back for this long: the connection is not delivering and is replaced.
PROBE_DEADLINE = 3.0
# A cluster's slot map is re-read this often, and as soon as a shard reports trouble.
TOPOLOGY_INTERVAL = 5.0
HASH_SLOTS = 16384
# Errors that say a channel's slot is served elsewhere (or is moving): find its new home.
_RELOCATED = (b"MOVED", b"ASK", b"TRYAGAIN", b"CLUSTERDOWN")

# A primary's host and port; None for the single node the URL names (maybe a Unix socket).
Address = tuple[str, int] | None


def _tls(address: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py would build from the URL's ssl_* options."""
    options = {k.removeprefix("ssl_"): v for k, v in address.items() if k.startswith("ssl_")}
    options.setdefault("cert_reqs", "required")
    options.setdefault("check_hostname", True)
    return RedisSSLContext(**options).get()


class ConnectionLost(Exception):
    pass


# A connection to drop and replace: it failed, went silent, or Redis refused it.
_DROPPED: tuple[type[Exception], ...] = (ConnectionLost, TimeoutError, *UNAVAILABLE)


class _Moved(Exception):
    """The channel left this shard while a subscribe waited for its confirmation."""


class _Wire(asyncio.Protocol):
    """One Pub/Sub socket: parses replies as they arrive and hands each to ``on_reply``."""

    def __init__(self, on_reply: Callable[[Any], None], on_chunk_end: Callable[[], None]) -> None:
        self._parser = hiredis.Reader()
        self._on_reply = on_reply
        self._on_chunk_end = on_chunk_end
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The run loop reads it while connected; after a drop nobody will, and asyncio would
        # log the exception as never retrieved.
        self.lost.add_done_callback(lambda f: f.cancelled() or f.exception())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not False:
                self._on_reply(reply)
        except Exception as exc:  # a broken stream, a refusal, or a bug: reconnect, catch up
            self.fail(exc)
        finally:
            self._on_chunk_end()

    def fail(self, exc: Exception) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_exception(ConnectionLost(str(exc or "closed by redis")))

    def send(self, *args: str) -> None:
        # A dropped connection is replaced (and resubscribed) by the shard's run loop a few
        # iterations later; until then a write would raise on uvloop.
        if self.lost.done() or self.transport is None or self.transport.is_closing():
            return
        # hiredis's stub declares a one-element tuple; any number of arguments is fine.
        self.transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]


class _Shard:
    """The connection to one primary and the channels subscribed through it."""

    def __init__(self, reader: Reader, address: Address, probe_channel: str) -> None:
        self.address = address
        self._reader = reader
        self.probe_channel = probe_channel
        self._probe_bytes = probe_channel.encode()  # compared with every message
        self._probe_seen = 0.0
        self.wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Channels that arrived from another shard (or came back after a gap): confirming
        # them must trigger a catch-up. Collected per socket read and handed over together.
        self._adopted: set[str] = set()
        self._recovered: list[str] = []
        # Every command sent whose reply has not arrived, oldest first: Redis answers in
        # order, so each reply (or error) belongs to the oldest one.
        self._sent: deque[tuple[bytes, str]] = deque()
        # The same, counted per channel. A subscribe reply confirms a channel only when
        # nothing newer is outstanding: an old reply must not vouch for a channel whose
        # SUNSUBSCRIBE (and new SSUBSCRIBE) are still on their way.
        self._outstanding: Counter[str] = Counter()
        self._wire: _Wire | None = None
        self.connected = False
        # Channels were subscribed on a connection that dropped: everything they carry
        # must be caught up once they are subscribed again.
        self._gap = False
        self._down_logged = False
        self.task: asyncio.Task[None] | None = None

    @property
    def delivering(self) -> bool:
        return self.connected and time.monotonic() - self._probe_seen < PROBE_DEADLINE

    async def subscribe(self, channel: str) -> None:
        self.wanted.add(channel)
        if channel in self._confirmed:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, [])
        waiters.append(waiter)
        # Sent even if an earlier SSUBSCRIBE is on its way: repeating one is harmless, and
        # that earlier one may be followed by an SUNSUBSCRIBE.
        self._send(b"SSUBSCRIBE", channel)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    def unsubscribe(self, channel: str) -> None:
        self.wanted.discard(channel)
        self._confirmed.discard(channel)
        self._adopted.discard(channel)
        self._send(b"SUNSUBSCRIBE", channel)

    def adopt(self, channel: str) -> None:
        """Take over a channel that missed frames: subscribe it, then have it caught up."""
        self.wanted.add(channel)
        self._adopted.add(channel)
        self._send(b"SSUBSCRIBE", channel)

    def release(self, channel: str) -> None:
        """Hand the channel to another shard; anyone waiting here retries there."""
        self.unsubscribe(channel)
        for waiter in self._waiters.get(channel, ()):
            if not waiter.done():
                waiter.set_exception(_Moved())

    def move_probe(self, channel: str) -> None:
        self._send(b"SUNSUBSCRIBE", self.probe_channel)
        self.probe_channel = channel
        self._probe_bytes = channel.encode()
        self._probe_seen = time.monotonic()  # give the new channel a full deadline
        self._send(b"SSUBSCRIBE", channel)

    def _send(self, command: bytes, channel: str) -> None:
        # While disconnected nothing is sent: the reconnect subscribes ``wanted`` anyway.
        if self._wire is not None:
            self._outstanding[channel] += 1
            self._sent.append((command, channel))
            self._wire.send(command.decode(), channel)

    async def run(self) -> None:
        """Read forever, reconnecting with capped backoff; cancel to stop."""
        backoff = _BACKOFF_MIN
        while True:
            try:
                wire = await self._connect()
                self._wire = wire
                recovering, self._gap = self._gap, False
                if recovering:
                    # Everything published while disconnected was missed.
                    self._adopted |= self.wanted
                await self._restore(wire)
                self._probe_seen = time.monotonic()
                self.connected = True
                self._reader.shard_changed()
                if recovering:
                    log.info("pubsub reconnected to %s; catching up", self._name)
                    self._reader.reconnected()
                self._down_logged = False
                backoff = _BACKOFF_MIN
                await self._watch(wire)
            except _DROPPED as exc:
                self._lost(f"pubsub connection to {self._name} lost: {exc or type(exc).__name__}")
            except Exception:
                # Anything unexpected must not end the reader: connections would stay open
                # and silent. Treat it as a lost connection, which catches everyone up.
                log.exception("pubsub reader of %s failed; reconnecting", self._name)
                self._lost(f"pubsub reader of {self._name} failed")
            finally:
                self._drop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    @property
    def _name(self) -> str:
        return "redis" if self.address is None else f"{self.address[0]}:{self.address[1]}"

    def _lost(self, why: str) -> None:
        # Also when the connection drops while still subscribing: channels confirmed on
        # it may already have delivered frames, so what follows is a gap.
        if self.connected or self._confirmed or self._gap:
            self.connected = False
            self._gap = True
            self._reader.lost(self.wanted)
        self._reader.shard_changed()
        if not self._down_logged:  # once per outage, not once per attempt
            log.warning("%s; retrying until it answers", why)
            self._down_logged = True

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        options = self._reader.options
        kind = options.get("connection_class")

        def factory() -> _Wire:
            return _Wire(self._handle, self._chunk_end)

        if kind is UnixDomainSocketConnection and self.address is None:
            connecting = loop.create_unix_connection(factory, options["path"])
        else:
            host, port = self.address or (
                options.get("host", "localhost"),
                options.get("port", 6379),
            )
            tls = _tls(options) if kind is SSLConnection else None
            connecting = loop.create_connection(factory, host, port, ssl=tls)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as its awaitable completes, and the reader would outlive shutdown.
        async with asyncio.timeout(PROBE_DEADLINE):
            _, wire = await connecting
        self._outstanding.clear()
        self._sent.clear()
        if options.get("password"):
            credentials = [options["username"]] if options.get("username") else []
            # A refused AUTH arrives as an error reply, which drops the connection.
            self._sent.append((b"AUTH", ""))
            wire.send("AUTH", *credentials, options["password"])
        return wire

    async def _restore(self, wire: _Wire) -> None:
        channels = [self.probe_channel, *sorted(self.wanted)]
        self._confirmed.clear()
        for channel in channels:
            # One channel per command: in a cluster all channels of one SSUBSCRIBE must
            # share a slot, and one per command keeps each error tied to its channel.
            self._send(b"SSUBSCRIBE", channel)
        # Redis confirms in order. Tens of thousands of channels take a while: the deadline
        # is for progress, not the total.
        deadline = time.monotonic() + PROBE_DEADLINE
        left = len(self._sent)
        while self._sent:
            if wire.lost.done():
                wire.lost.result()
            if len(self._sent) < left:
                left, deadline = len(self._sent), time.monotonic() + PROBE_DEADLINE
            elif time.monotonic() > deadline:
                raise TimeoutError("pubsub subscriptions not confirmed")
            await asyncio.sleep(0.01)

    async def _watch(self, wire: _Wire) -> None:
        """Until the connection drops, or the probe stops coming back."""
        while True:
            await asyncio.wait({wire.lost}, timeout=PROBE_INTERVAL)
            if wire.lost.done():
                wire.lost.result()
            if time.monotonic() - self._probe_seen > PROBE_DEADLINE:
                raise TimeoutError("the pubsub probe did not come back")

    def _handle(self, reply: Any) -> None:
        """Route one reply: a message to the hub, a confirmation to its waiters."""
        if isinstance(reply, hiredis.ReplyError):
            self._refused(reply)
            return
        if not isinstance(reply, list):
            if self._sent and self._sent[0][0] == b"AUTH":
                self._sent.popleft()  # +OK
            return
        kind = reply[0]
        if kind == b"smessage":
            if reply[1] == self._probe_bytes:
                self._probe_seen = time.monotonic()
            else:
                self._reader.on_message(reply[1], reply[2])
            return
        if kind not in (b"ssubscribe", b"sunsubscribe"):
            return
        channel = reply[1].decode()
        # Redis answers in command order: a reply is the answer to the oldest command only
        # if it matches it. An SUNSUBSCRIBE that matches nothing was not asked for: the node
        # no longer serves the channel's slot.
        if self._sent and self._sent[0] == (kind.upper(), channel):
            self._answered()
            if kind == b"ssubscribe" and not self._outstanding[channel]:
                self._confirm(channel)
        elif kind == b"sunsubscribe":
            self._displaced(channel)

    def _answered(self) -> str:
        """Retire the oldest command; returns its channel."""
        _, channel = self._sent.popleft()
        self._outstanding[channel] -= 1
        if not self._outstanding[channel]:
            del self._outstanding[channel]
        return channel

    def _refused(self, error: hiredis.ReplyError) -> None:
        if not self._sent or self._sent[0][0] == b"AUTH":
            raise ConnectionLost(f"redis refused: {error}")
        command = self._sent[0][0]
        channel = self._answered()
        if str(error).encode().startswith(_RELOCATED):
            if command == b"SUNSUBSCRIBE":
                return  # a channel released after its slot had already moved: not here
            if channel == self.probe_channel:
                self._reader.refresh()  # the next slot map gives this shard a new probe
            else:
                self._displaced(channel)
            return
        raise ConnectionLost(f"redis refused {command.decode()} {channel}: {error}")

    def _displaced(self, channel: str) -> None:
        if channel == self.probe_channel:
            self._reader.refresh()
            return
        if channel not in self.wanted:
            return
        self.release(channel)
        self._reader.homeless(channel)

    def _confirm(self, channel: str) -> None:
        if channel not in self.wanted:
            return
        self._confirmed.add(channel)
        if channel in self._adopted:
            self._adopted.discard(channel)
            self._recovered.append(channel)
        for waiter in self._waiters.get(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _chunk_end(self) -> None:
        if self._recovered:
            recovered, self._recovered = self._recovered, []
            self._reader.restored(recovered)
        self._reader.on_chunk_end()

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        self._confirmed.clear()
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._drop()


class Reader:
    """Routes each channel to the shard that serves its slot, and follows the slot map."""

    def __init__(self, redis: Client, redis_url: str, process_id: str) -> None:
        self._redis = redis
        self.options: dict[str, Any] = dict(parse_url(redis_url))
        self._process = process_id
        self._shards: dict[Address, _Shard] = {}
        self._map: list[tuple[int, int, Address]] = []
        self._owners: list[Address] = []
        # Channels displaced from their shard, waiting for the next slot map.
        self._homeless: set[str] = set()
        self._refresh = asyncio.Event()
        self._mapped = asyncio.Event()
        self.connected = asyncio.Event()
        self.on_message: Callable[[bytes, bytes], None] = lambda _c, _f: None
        self._on_lost: Callable[[Iterable[str]], None] = lambda _c: None
        self._on_restored: Callable[[Iterable[str]], None] = lambda _c: None
        self.on_chunk_end: Callable[[], None] = lambda: None
        self._on_reconnect: Callable[[], None] = lambda: None
        self._map_logged = False

    @property
    def delivering(self) -> bool:
        """Every shard connected, and its probe back recently: the readiness signal."""
        return bool(self._shards) and all(s.delivering for s in self._shards.values())

    def attach(
        self,
        on_message: Callable[[bytes, bytes], None],
        on_lost: Callable[[Iterable[str]], None],
        on_restored: Callable[[Iterable[str]], None],
        on_chunk_end: Callable[[], None],
        on_reconnect: Callable[[], None],
    ) -> None:
        """``on_lost`` names the channels whose frames may have a gap from now on, and
        ``on_restored`` the ones subscribed again, to be caught up from history.
        ``on_chunk_end`` follows each socket read; ``on_reconnect`` each replaced connection.
        """
        self.on_message, self._on_lost, self._on_restored = on_message, on_lost, on_restored
        self.on_chunk_end, self._on_reconnect = on_chunk_end, on_reconnect

    async def subscribe(self, channel: str) -> None:
        """Subscribe ``channel`` (if not already) and wait until Redis confirmed it."""
        await self._mapped.wait()
        while True:
            shard = self._shards.get(self._owner(channel))
            if shard is None:  # its slot has no primary right now (a cluster failing over)
                await asyncio.sleep(_BACKOFF_MIN)
                continue
            with contextlib.suppress(_Moved):  # moved while waiting: route it again
                await shard.subscribe(channel)
                return

    def unsubscribe(self, channel: str) -> None:
        self._homeless.discard(channel)
        shard = self._shards.get(self._owner(channel)) if self._owners else None
        if shard is not None:
            shard.unsubscribe(channel)

    async def run(self) -> None:
        """Follow the slot map and run one connection per primary; cancel to stop."""
        backoff = _BACKOFF_MIN
        try:
            while True:
                try:
                    self._apply(await self._slot_map())
                    backoff = _BACKOFF_MIN
                except Exception as exc:  # any failure: this loop must never end
                    if not self._map_logged:
                        log.warning("cluster slot map unavailable (%s); retrying", exc)
                        self._map_logged = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                self._map_logged = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TOPOLOGY_INTERVAL):
                        await self._refresh.wait()
                self._refresh.clear()
                # A failover shows up as several reports at once: read the map once for all.
                await asyncio.sleep(_BACKOFF_MIN)
        finally:
            self.close()

    async def _slot_map(self) -> list[tuple[int, int, Address]]:
        if not isinstance(self._redis, RedisCluster):
            return [(0, HASH_SLOTS - 1, None)]
        async with asyncio.timeout(PROBE_DEADLINE):
            # Parsed by redis-py: (start, end) -> {"primary": (host, port), ...}
            slots = cast(dict[tuple[int, int], Any], await self._redis.cluster_slots())
        return [(start, end, tuple(shard["primary"])) for (start, end), shard in slots.items()]

    def _apply(self, slot_map: list[tuple[int, int, Address]]) -> None:
        if slot_map == self._map and not self._homeless:
            return  # the usual case: nothing moved, no channel to re-check
        self._map = slot_map
        owners: list[Address] = [None] * HASH_SLOTS
        for start, end, address in slot_map:
            owners[start : end + 1] = [address] * (end - start + 1)
        self._owners = owners
        primaries = {address for _, _, address in slot_map}
        for address in primaries - self._shards.keys():
            shard = _Shard(self, address, self._probe_for(address))
            shard.task = asyncio.create_task(shard.run())
            self._shards[address] = shard
        moved = set(self._homeless)
        self._homeless.clear()
        for shard in self._shards.values():
            for channel in [c for c in shard.wanted if self._owner(c) != shard.address]:
                shard.release(channel)
                moved.add(channel)
            if shard.address in primaries and self._owner(shard.probe_channel) != shard.address:
                shard.move_probe(self._probe_for(shard.address))
        for address in self._shards.keys() - primaries:
            self._shards.pop(address).close()
        if moved:
            self._on_lost(moved)
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
        while self._owner(channel := f"notify:probe:{self._process}:{{{tag}}}") != address:
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

    async def _probe(self, shard: _Shard) -> None:
        # A probe that fails is what the shard's deadline detects: nothing to handle here.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(PROBE_INTERVAL):
                await self._redis.spublish(shard.probe_channel, b"")

    # Reports from the shards.

    def lost(self, channels: Iterable[str]) -> None:
        self._on_lost(list(channels))
        self.refresh()

    def restored(self, channels: list[str]) -> None:
        self._on_restored(channels)

    def reconnected(self) -> None:
        self._on_reconnect()

    def homeless(self, channel: str) -> None:
        self._homeless.add(channel)
        self._on_lost([channel])
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
