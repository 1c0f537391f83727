"""One shard's Pub/Sub subscriptions as a sans-I/O state machine: bytes in, events out.

A shard is the connection to one Redis primary (the only one, on a single node). This
module decides what to send and what each reply means; :mod:`.wire` moves the bytes and
keeps the clock, like python-websockets' ``Protocol`` under its asyncio connection. So
every rule below can be tested by feeding replies and reading events, without a server.

Redis answers commands in order, so each subscribe reply (or error) belongs to the oldest
command still unanswered; a reply that matches none was not asked for. The rules:

- A channel is *confirmed* by its SSUBSCRIBE reply only when no newer command for it is
  outstanding: an old reply must not vouch for a channel whose SUNSUBSCRIBE (and new
  SSUBSCRIBE) are still on their way.
- An SUNSUBSCRIBE nobody asked for, or MOVED/ASK/TRYAGAIN/CLUSTERDOWN in answer to an
  SSUBSCRIBE, means this node no longer serves the channel's slot: it is *displaced*, and
  must be routed again.
- Any other error is a *refusal*: the connection cannot be trusted and is replaced.
- A channel that arrives from another shard (*adopted*), or every channel after a dropped
  connection (a *gap*), may have missed frames: its confirmation says ``catch_up``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis

# Errors that say a channel's slot is served elsewhere (or is moving): find its new home.
RELOCATED = (b"MOVED", b"ASK", b"TRYAGAIN", b"CLUSTERDOWN")
SSUBSCRIBE, SUNSUBSCRIBE, AUTH = b"SSUBSCRIBE", b"SUNSUBSCRIBE", b"AUTH"
# hiredis's "no complete reply yet"; a sentinel of our own, as redis-py uses, since False
# is also a valid RESP3 reply.
_INCOMPLETE = object()


# Events. Not frozen: a Message is built for every notification the process reads, and a
# frozen dataclass's __init__ costs twice as much.
@dataclass(slots=True)
class Message:
    channel: bytes
    payload: bytes


@dataclass(slots=True)
class Confirmed:
    """Redis confirmed the subscription; ``catch_up``: frames may have been missed."""

    channel: str
    catch_up: bool


@dataclass(slots=True)
class Displaced:
    """This node no longer serves the channel's slot (the probe's, or a wanted one's)."""

    channel: str


@dataclass(slots=True)
class Refused:
    """The connection cannot go on (an error reply, an unreadable stream): replace it."""

    reason: str


@dataclass(slots=True)
class ProbeSeen:
    """This shard's probe came back: the connection delivers."""


Event = Message | Confirmed | Displaced | Refused | ProbeSeen
_PROBE_SEEN = ProbeSeen()


class ShardProtocol:
    """Subscriptions of one shard across its connections; knows nothing of sockets or time."""

    def __init__(self, probe_channel: str) -> None:
        self.probe_channel = probe_channel
        self._probe_bytes = probe_channel.encode()  # compared with every message
        # What should be subscribed, whatever the connection's state.
        self.wanted: set[str] = set()
        self._confirmed: set[str] = set()
        # Channels whose confirmation must say catch_up.
        self._adopted: set[str] = set()
        # Every command sent whose reply has not arrived, oldest first ...
        self._sent: deque[tuple[bytes, str]] = deque()
        # ... and the same counted per channel.
        self._outstanding: Counter[str] = Counter()
        self._parser: Any = None  # a hiredis.Reader while connected
        self._out: list[bytes] = []
        # Channels were subscribed on a connection that dropped.
        self._gap = False

    # The connection's life cycle

    def connect(self, credentials: Sequence[str] = ()) -> bool:
        """A new connection: authenticate, subscribe the probe and every wanted channel.

        Returns True when it follows a gap: every channel will be confirmed with catch_up.
        """
        self._parser = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._sent.clear()
        self._outstanding.clear()
        self._confirmed.clear()
        self._out.clear()
        recovering, self._gap = self._gap, False
        if recovering:
            self._adopted |= self.wanted
        if credentials:
            # A refused AUTH arrives as an error reply, which refuses the connection.
            self._sent.append((AUTH, ""))
            self._out.append(_pack(AUTH.decode(), *credentials))
        # One channel per command: in a cluster all channels of one SSUBSCRIBE must share a
        # slot, and one per command keeps each error tied to its channel.
        for channel in (self.probe_channel, *sorted(self.wanted)):
            self._send(SSUBSCRIBE, channel)
        return recovering

    def disconnect(self, was_live: bool) -> bool:
        """The connection dropped. True when its channels may miss frames: hold them.

        Also when it drops while still subscribing: channels confirmed on it may already
        have delivered frames.
        """
        self._gap = was_live or bool(self._confirmed) or self._gap
        self._parser = None
        self._confirmed.clear()
        return self._gap

    @property
    def unanswered(self) -> int:
        """Commands sent on this connection and not answered yet."""
        return len(self._sent)

    # What the reader asks for

    def subscribe(self, channel: str) -> bool:
        """Want ``channel``; True if it is confirmed already (nothing to wait for).

        Sent even if an earlier SSUBSCRIBE is on its way: repeating one is harmless, and
        that earlier one may be followed by an SUNSUBSCRIBE.
        """
        self.wanted.add(channel)
        if channel in self._confirmed:
            return True
        self._send(SSUBSCRIBE, channel)
        return False

    def unsubscribe(self, channel: str) -> None:
        self.wanted.discard(channel)
        self._confirmed.discard(channel)
        self._adopted.discard(channel)
        self._send(SUNSUBSCRIBE, channel)

    def adopt(self, channel: str) -> None:
        """Take over a channel that missed frames: subscribe it, confirm it with catch_up."""
        self.wanted.add(channel)
        self._adopted.add(channel)
        self._send(SSUBSCRIBE, channel)

    def move_probe(self, channel: str) -> None:
        self._send(SUNSUBSCRIBE, self.probe_channel)
        self.probe_channel = channel
        self._probe_bytes = channel.encode()
        self._send(SSUBSCRIBE, channel)

    def data_to_send(self) -> bytes:
        out, self._out = self._out, []
        return b"".join(out)

    # What Redis says

    def receive_data(self, data: bytes) -> list[Event]:
        """The events in ``data``; a Refused one is the last (the connection is done)."""
        parser = self._parser
        if parser is None:
            return []  # a connection already given up
        parser.feed(data)
        events: list[Event] = []
        try:
            while (reply := parser.gets()) is not _INCOMPLETE:
                event = self._reply(reply)
                if event is not None:
                    events.append(event)
                    if type(event) is Refused:
                        break
        except hiredis.ProtocolError as exc:
            events.append(Refused(f"unreadable reply stream: {exc}"))
        return events

    def _send(self, command: bytes, channel: str) -> None:
        # While disconnected nothing is sent: the next connect subscribes ``wanted`` anyway.
        if self._parser is not None:
            self._outstanding[channel] += 1
            self._sent.append((command, channel))
            self._out.append(_pack(command.decode(), channel))

    def _reply(self, reply: Any) -> Event | None:
        if isinstance(reply, hiredis.ReplyError):
            return self._refused(reply)
        if not isinstance(reply, list):
            if self._sent and self._sent[0][0] == AUTH:
                self._sent.popleft()  # +OK
            return None
        kind = reply[0]
        if kind == b"smessage":
            if reply[1] == self._probe_bytes:
                return _PROBE_SEEN
            return Message(reply[1], reply[2])
        if kind not in (b"ssubscribe", b"sunsubscribe"):
            return None
        channel = reply[1].decode()
        if self._sent and self._sent[0] == (kind.upper(), channel):
            self._answered()
            if kind == b"ssubscribe" and not self._outstanding[channel]:
                return self._confirm(channel)
            return None
        if kind == b"sunsubscribe":
            return self._displaced(channel)  # not asked for
        return None

    def _answered(self) -> str:
        """Retire the oldest command; returns its channel."""
        _, channel = self._sent.popleft()
        self._outstanding[channel] -= 1
        if not self._outstanding[channel]:
            del self._outstanding[channel]
        return channel

    def _refused(self, error: hiredis.ReplyError) -> Event | None:
        if not self._sent or self._sent[0][0] == AUTH:
            return Refused(f"redis refused: {error}")
        command = self._sent[0][0]
        channel = self._answered()
        if str(error).encode().startswith(RELOCATED):
            if command == SUNSUBSCRIBE:
                return None  # a channel released after its slot had already moved: not here
            return self._displaced(channel)
        return Refused(f"redis refused {command.decode()} {channel}: {error}")

    def _displaced(self, channel: str) -> Event | None:
        if channel == self.probe_channel:
            return Displaced(channel)
        if channel not in self.wanted:
            return None
        self.unsubscribe(channel)
        return Displaced(channel)

    def _confirm(self, channel: str) -> Event | None:
        if channel not in self.wanted:
            return None
        self._confirmed.add(channel)
        catch_up = channel in self._adopted
        self._adopted.discard(channel)
        return Confirmed(channel, catch_up)


def _pack(*args: str) -> bytes:
    # hiredis's stub declares a one-element tuple; any number of arguments is fine.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed
