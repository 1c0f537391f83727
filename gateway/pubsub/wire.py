"""The I/O of one shard: its socket, reconnection, resubscription and the probe's clock.

Written as an asyncio protocol with hiredis parsing rather than on redis-py's PubSub helper,
for two reasons. Reconnection is explicit: a dropped connection means frames were published
that this process never saw, and the listener must hold the live stream of every student
on that shard and refill it from history once the subscriptions are confirmed again; a
helper that silently reconnects would hide that gap. And every message in a chunk read from
the socket is dispatched in one synchronous pass, without an await per message, which
under load was the largest cost of the process after the socket writes themselves.

What each reply means is decided by :class:`.shard.ShardProtocol`; this module only feeds
it bytes and acts on its events.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, cast

from redis.asyncio.connection import RedisSSLContext, SSLConnection, UnixDomainSocketConnection

from notify.redis_client import UNAVAILABLE

from .listener import PubSubListener, Topology
from .shard import Confirmed, Displaced, Message, ProbeSeen, Refused, ShardProtocol

log = logging.getLogger(__name__)

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
PROBE_INTERVAL = 1.0
# No probe read back for this long: the connection is not delivering and is replaced.
PROBE_DEADLINE = 3.0

# A primary's host and port; None for the single node the URL names (maybe a Unix socket).
Address = tuple[str, int] | None


class ConnectionLost(Exception):
    pass


class Moved(Exception):
    """The channel left this shard while a subscribe waited for its confirmation."""


# A connection to drop and replace: it failed, went silent, or Redis refused it.
_DROPPED: tuple[type[Exception], ...] = (ConnectionLost, TimeoutError, *UNAVAILABLE)


def _tls(address: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py would build from the URL's ssl_* options."""
    options = {k.removeprefix("ssl_"): v for k, v in address.items() if k.startswith("ssl_")}
    options.setdefault("cert_reqs", "required")
    options.setdefault("check_hostname", True)
    return RedisSSLContext(**options).get()


class _Wire(asyncio.Protocol):
    """One Pub/Sub socket: bytes to the shard's protocol, its events to the shard."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The run loop reads it while connected; after a drop nobody will, and asyncio would
        # log the exception as never retrieved.
        self.lost.add_done_callback(lambda f: f.cancelled() or f.exception())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._shard.received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionLost(str(exc or "closed by redis")))

    def fail(self, exc: Exception) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        # A dropped connection is replaced (and resubscribed) by the shard's run loop a few
        # iterations later; until then a write would raise on uvloop.
        if data and not self.lost.done() and self.transport and not self.transport.is_closing():
            self.transport.write(data)


class Shard:
    """The connection to one primary: connects, resubscribes, and watches the probe."""

    def __init__(
        self,
        address: Address,
        probe_channel: str,
        options: dict[str, Any],
        topology: Topology,
        listener: PubSubListener,
    ) -> None:
        self.address = address
        self.protocol = ShardProtocol(probe_channel)
        self._options = options
        self._topology = topology
        self._listener = listener
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Channels confirmed with catch_up, handed over together at the end of each read.
        self._recovered: list[str] = []
        self._wire: _Wire | None = None
        self._probe_seen = 0.0
        # Subscribed and confirmed on the current connection: readiness.
        self.connected = False
        self._down_logged = False
        self.task: asyncio.Task[None] | None = None

    @property
    def delivering(self) -> bool:
        return self.connected and time.monotonic() - self._probe_seen < PROBE_DEADLINE

    @property
    def name(self) -> str:
        return "redis" if self.address is None else f"{self.address[0]}:{self.address[1]}"

    async def subscribe(self, channel: str) -> None:
        """Until Redis confirmed ``channel``; :class:`Moved` if its slot left this shard."""
        if self.protocol.subscribe(channel):
            return
        self._flush()
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, [])
        waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    def unsubscribe(self, channel: str) -> None:
        self.protocol.unsubscribe(channel)
        self._flush()

    def adopt(self, channel: str) -> None:
        self.protocol.adopt(channel)
        self._flush()

    def release(self, channel: str) -> None:
        """Hand the channel to another shard; anyone waiting here retries there."""
        self.protocol.unsubscribe(channel)
        self._flush()
        self._moved(channel)

    def move_probe(self, channel: str) -> None:
        self.protocol.move_probe(channel)
        self._probe_seen = time.monotonic()  # give the new channel a full deadline
        self._flush()

    def received(self, wire: _Wire, data: bytes) -> None:
        """Act on the events of one socket read, then flush the listener's writes."""
        listener = self._listener
        try:
            for event in self.protocol.receive_data(data):
                if type(event) is Message:
                    listener.message(event.channel, event.payload)
                elif type(event) is ProbeSeen:
                    self._probe_seen = time.monotonic()
                elif type(event) is Confirmed:
                    self._confirmed(event)
                elif type(event) is Displaced:
                    self._displaced(event.channel)
                elif type(event) is Refused:
                    wire.fail(ConnectionLost(event.reason))
        except Exception as exc:  # a bug: reconnect, which catches everyone up
            log.exception("pubsub reply handling failed")
            wire.fail(exc)
        finally:
            self._flush()
            if self._recovered:
                recovered, self._recovered = self._recovered, []
                listener.catch_up(recovered)
            listener.flush()

    def _confirmed(self, event: Confirmed) -> None:
        if event.catch_up:
            self._recovered.append(event.channel)
        for waiter in self._waiters.get(event.channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _displaced(self, channel: str) -> None:
        if channel == self.protocol.probe_channel:
            self._topology.refresh()  # the next slot map gives this shard a new probe
            return
        self._moved(channel)
        self._topology.displaced(channel)

    def _moved(self, channel: str) -> None:
        for waiter in self._waiters.get(channel, ()):
            if not waiter.done():
                waiter.set_exception(Moved())

    def _flush(self) -> None:
        data = self.protocol.data_to_send()
        if self._wire is not None:
            self._wire.write(data)

    async def run(self) -> None:
        """Read forever, reconnecting with capped backoff; cancel to stop."""
        backoff = BACKOFF_MIN
        while True:
            try:
                wire = await self._connect()
                self._wire = wire
                recovering = self.protocol.connect(self._credentials())
                self._flush()
                await self._subscribed(wire)
                self._probe_seen = time.monotonic()
                self.connected = True
                self._topology.shard_changed()
                if recovering:
                    log.info("pubsub reconnected to %s; catching up", self.name)
                    self._listener.reconnected()
                self._down_logged = False
                backoff = BACKOFF_MIN
                await self._watch(wire)
            except _DROPPED as exc:
                self._lost(f"pubsub connection to {self.name} lost: {exc or type(exc).__name__}")
            except Exception:
                # Anything unexpected must not end the reader: connections would stay open
                # and silent. Treat it as a lost connection, which catches everyone up.
                log.exception("pubsub reader of %s failed; reconnecting", self.name)
                self._lost(f"pubsub reader of {self.name} failed")
            finally:
                self._drop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _lost(self, why: str) -> None:
        if self.protocol.disconnect(was_live=self.connected):
            self._listener.hold(list(self.protocol.wanted))
            self._topology.refresh()
        self.connected = False
        self._topology.shard_changed()
        if not self._down_logged:  # once per outage, not once per attempt
            log.warning("%s; retrying until it answers", why)
            self._down_logged = True

    def _credentials(self) -> list[str]:
        password = self._options.get("password")
        if not password:
            return []
        username = self._options.get("username")
        return [username, password] if username else [password]

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        options = self._options
        kind = options.get("connection_class")

        def factory() -> _Wire:
            return _Wire(self)

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
        return wire

    async def _subscribed(self, wire: _Wire) -> None:
        """Until Redis answered every command of the new connection.

        Tens of thousands of channels take a while: the deadline is for progress, not the
        total.
        """
        deadline = time.monotonic() + PROBE_DEADLINE
        left = self.protocol.unanswered
        while self.protocol.unanswered:
            if wire.lost.done():
                wire.lost.result()
            if self.protocol.unanswered < left:
                left, deadline = self.protocol.unanswered, time.monotonic() + PROBE_DEADLINE
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

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._drop()
