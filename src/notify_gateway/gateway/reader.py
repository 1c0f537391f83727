"""The process's one Redis Pub/Sub connection, and the probe that proves it delivers.

Written as an asyncio protocol with hiredis parsing rather than on redis-py's PubSub helper,
for two reasons. Reconnection is explicit: a dropped connection means frames were published
that this process never saw, and the hub must hold every student's live stream and refill
it from history once the subscriptions are confirmed again; a helper that silently
reconnects would hide that gap. And every message in a chunk read from the socket is
dispatched in one synchronous pass, without an await per message, which under load was the
largest cost of the process after the socket writes themselves.

A connection can also look healthy while delivering nothing (a half-open TCP connection, a
subscription lost on the server side). So the process publishes to a probe channel of its
own every second, through its ordinary Redis client, and expects to read it back here; when
the probe stops arriving the process reports not ready and replaces the connection, which
triggers the same catch-up as any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# SUBSCRIBE arguments per command when restoring many channels after a reconnect.
_RESUBSCRIBE_CHUNK = 1000
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
PROBE_INTERVAL = 1.0
# No probe read back for this long: the connection is not delivering and is replaced.
PROBE_DEADLINE = 3.0


def _tls(address: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py would build from the URL's ssl_* options."""
    options = {k.removeprefix("ssl_"): v for k, v in address.items() if k.startswith("ssl_")}
    options.setdefault("cert_reqs", "required")
    options.setdefault("check_hostname", True)
    return RedisSSLContext(**options).get()


class ConnectionLost(Exception):
    pass


class _Wire(asyncio.Protocol):
    """The Pub/Sub socket: parses replies as they arrive and hands each to ``on_reply``."""

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
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionLost(f"redis refused: {reply}")
                self._on_reply(reply)
        except Exception as exc:  # a broken stream, or a bug: reconnect and catch up
            if not self.lost.done():
                self.lost.set_exception(exc)
            assert self.transport is not None
            self.transport.abort()
        finally:
            self._on_chunk_end()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_exception(ConnectionLost(str(exc or "closed by redis")))

    def send(self, *args: str) -> None:
        # A dropped connection is replaced (and ``_wanted`` resubscribed) by the run loop a
        # few iterations later; until then a write would raise on uvloop.
        if self.lost.done() or self.transport is None or self.transport.is_closing():
            return
        # hiredis's stub declares a one-element tuple; any number of arguments is fine.
        self.transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]


class Reader:
    def __init__(self, redis_url: str, probe_channel: str) -> None:
        self._address = parse_url(redis_url)
        self._wire: _Wire | None = None
        self._probe_channel = probe_channel
        self._probe_bytes = probe_channel.encode()
        self._probe_seen = 0.0
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # One ordered queue for SUBSCRIBE/UNSUBSCRIBE, so a quick leave-then-join of the same
        # student reaches Redis in that order and the channel ends up subscribed.
        self._commands: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        # Per channel, commands queued or sent whose reply has not arrived. A subscribe reply
        # confirms a channel only when nothing newer is outstanding: an old reply must not
        # vouch for a channel whose UNSUBSCRIBE (and new SUBSCRIBE) are still on their way.
        self._outstanding: dict[str, int] = {}
        self._on_message: Callable[[bytes, bytes], None] = lambda _c, _f: None
        self._on_lost: Callable[[], None] = lambda: None
        self._on_restored: Callable[[], None] = lambda: None
        self._on_chunk_end: Callable[[], None] = lambda: None
        self.connected = asyncio.Event()
        self._down_logged = False

    @property
    def delivering(self) -> bool:
        """Connected, and the last probe came back recently: the readiness signal."""
        return self.connected.is_set() and time.monotonic() - self._probe_seen < PROBE_DEADLINE

    def attach(
        self,
        on_message: Callable[[bytes, bytes], None],
        on_lost: Callable[[], None],
        on_restored: Callable[[], None],
        on_chunk_end: Callable[[], None],
    ) -> None:
        """``on_chunk_end`` follows the messages of each read from the socket."""
        self._on_message, self._on_lost, self._on_restored = on_message, on_lost, on_restored
        self._on_chunk_end = on_chunk_end

    async def subscribe(self, channel: str) -> None:
        """Subscribe ``channel`` (if not already) and wait until Redis confirmed it."""
        self._wanted.add(channel)
        if channel in self._confirmed:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, [])
        waiters.append(waiter)
        # Sent even if an earlier SUBSCRIBE is on its way: repeating one is harmless, and
        # that earlier one may be followed by an UNSUBSCRIBE.
        self._queue("SUBSCRIBE", channel)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._confirmed.discard(channel)
        self._queue("UNSUBSCRIBE", channel)

    def _queue(self, command: str, channel: str) -> None:
        # While disconnected nothing is sent: the reconnect subscribes ``_wanted`` anyway.
        if self._wire is not None:
            self._outstanding[channel] = self._outstanding.get(channel, 0) + 1
            self._wire.send(command, channel)

    async def run(self) -> None:
        """Read forever, reconnecting with capped backoff; cancel to stop."""
        backoff = _BACKOFF_MIN
        first = True
        while True:
            try:
                wire = await self._connect()
                self._wire = wire
                self._outstanding.clear()
                await self._restore(wire)
                self._probe_seen = time.monotonic()
                self.connected.set()
                self._down_logged = False
                if not first:
                    log.info("pubsub reconnected; catching connections up from history")
                    self._on_restored()
                first = False
                backoff = _BACKOFF_MIN
                await self._watch(wire)
            except (ConnectionLost, RedisError, OSError, TimeoutError) as exc:
                self._lost(f"pubsub connection lost: {exc or type(exc).__name__}")
            except Exception:
                # Anything unexpected must not end the reader: connections would stay open
                # and silent. Treat it as a lost connection, which catches everyone up.
                log.exception("pubsub reader failed; reconnecting")
                self._lost("pubsub reader failed")
            finally:
                self._drop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _lost(self, why: str) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self._on_lost()
        if not self._down_logged:  # once per outage, not once per attempt
            log.warning("%s; retrying until it answers", why)
            self._down_logged = True

    async def probe(self, redis: Redis) -> None:
        """Publish to the probe channel forever; cancel to stop."""
        while True:
            with contextlib.suppress(RedisError, OSError):
                await redis.publish(self._probe_channel, b"")
            await asyncio.sleep(PROBE_INTERVAL)

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        address: dict[str, Any] = dict(self._address)
        kind = address.get("connection_class")

        def factory() -> _Wire:
            return _Wire(self._handle, self._on_chunk_end)

        if kind is UnixDomainSocketConnection:
            connecting = loop.create_unix_connection(factory, address["path"])
        else:
            tls = _tls(address) if kind is SSLConnection else None
            connecting = loop.create_connection(
                factory, address.get("host", "localhost"), address.get("port", 6379), ssl=tls
            )
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as its awaitable completes, and the reader would outlive shutdown.
        async with asyncio.timeout(PROBE_DEADLINE):
            _, wire = await connecting
        if address.get("password"):
            credentials = [address["username"]] if address.get("username") else []
            # A refused AUTH arrives as an error reply, which drops the connection.
            wire.send("AUTH", *credentials, address["password"])
        return wire

    async def _restore(self, wire: _Wire) -> None:
        channels = [self._probe_channel, *sorted(self._wanted)]
        self._confirmed.clear()
        for channel in channels:
            self._outstanding[channel] = 1
        for start in range(0, len(channels), _RESUBSCRIBE_CHUNK):
            wire.send("SUBSCRIBE", *channels[start : start + _RESUBSCRIBE_CHUNK])
        # Redis confirms in order, and a confirmed channel leaves _outstanding. Tens of
        # thousands of channels take a while: the deadline is for progress, not the total.
        deadline = time.monotonic() + PROBE_DEADLINE
        left = len(self._outstanding)
        while channels[-1] in self._outstanding:
            if wire.lost.done():
                wire.lost.result()
            if len(self._outstanding) < left:
                left, deadline = len(self._outstanding), time.monotonic() + PROBE_DEADLINE
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
        """Route one Pub/Sub reply: a message to the hub, a confirmation to its waiters."""
        if not isinstance(reply, list):
            return  # +OK to AUTH
        kind = reply[0]
        if kind == b"message":
            if reply[1] == self._probe_bytes:
                self._probe_seen = time.monotonic()
            else:
                self._on_message(reply[1], reply[2])
        elif kind in (b"subscribe", b"unsubscribe"):
            channel = reply[1].decode()
            left = self._outstanding.get(channel, 1) - 1
            if left > 0:
                self._outstanding[channel] = left
                return
            self._outstanding.pop(channel, None)
            if kind == b"subscribe":
                self._confirm(channel)

    def _confirm(self, channel: str) -> None:
        if channel not in self._wanted:
            return
        self._confirmed.add(channel)
        for waiter in self._waiters.get(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        self._confirmed.clear()
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    def close(self) -> None:
        self._drop()
