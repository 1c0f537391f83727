"""The client protocol as pure functions: event ids, frames, close codes.

Nothing here does I/O, so the gateway, the publish contract and the tests share one
definition of what goes over the wire (see docs/protocol.md).

An event id is ``<epoch>-<seq>``. ``seq`` counts one student's notifications (1, 2, 3, ...
with no holes) and ``epoch`` names the incarnation of that student's history: when the
history may have lost events (expiry, FLUSHALL, a failover; see :mod:`.incarnation`) a new
epoch starts, so an id from the old one can never be mistaken for a resumable position.
Every position the server hands out names its incarnation, ``<epoch>-0`` before its first
event. Clients treat ids as opaque strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, NamedTuple

import orjson
from websockets.frames import Frame, Opcode

# Sequence 0 is the position before an incarnation's first event.
_EVENT_ID = re.compile(r"^([a-z0-9]{1,32})-(0|[1-9][0-9]{0,18})$")
# Every event frame starts with this prefix (the publish function writes it), which lets the
# gateway read an event's id without parsing the JSON of every message it fans out.
EVENT_PREFIX = b'{"type":"event","id":"'
MAX_CLIENT_FRAME_BYTES = 4096


class CloseCode(IntEnum):
    """WebSocket close codes the gateway sends; docs/protocol.md says what a client does."""

    NORMAL = 1000
    POLICY_VIOLATION = 1008  # a client frame that is not a JSON object
    TOO_BIG = 1009  # a client frame over MAX_CLIENT_FRAME_BYTES
    SERVICE_RESTART = 1012  # the gateway is shutting down: reconnect and resume
    TRY_AGAIN_LATER = 1013  # the gateway cannot serve right now: reconnect with backoff
    TOKEN_EXPIRED = 4001  # the JWT's exp passed: reconnect with a fresh token and resume
    SLOW_CONSUMER = 4008  # the send queue overflowed: reconnect and resume
    TOO_MANY_CONNECTIONS = 4029  # the student has too many open connections


class EventId(NamedTuple):
    """Ordered like (epoch, seq). A tuple: built for every live frame, and a frozen
    dataclass's __init__ costs several times more."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"


class Order(Enum):
    """Where a live event stands against the last one a client was sent."""

    IN_ORDER = "in order"  # the next one: send it
    DUPLICATE = "duplicate"  # already sent (from history, at the seam with live): drop it
    GAP = "gap"  # events are missing before it: fill them from history first


IN_ORDER, DUPLICATE, GAP = Order.IN_ORDER, Order.DUPLICATE, Order.GAP


def classify(last: EventId, event: EventId) -> Order:
    """The one ordering rule of delivery: ``event`` after ``last``, the last one sent.

    Another epoch is always a gap: the old incarnation may have ended with events this
    client never got (a failover loses the primary's last writes), and only the history can
    tell, by answering with a resync.
    """
    if event.epoch != last.epoch:
        return GAP
    if event.seq <= last.seq:
        return DUPLICATE
    return IN_ORDER if event.seq == last.seq + 1 else GAP


def parse_event_id(raw: str) -> EventId | None:
    match = _EVENT_ID.match(raw)
    if match is None:
        return None
    return EventId(match.group(1), int(match.group(2)))


def event_id_of(frame: bytes) -> EventId | None:
    """The id of an event frame written by the publish function, or None for anything else."""
    if not frame.startswith(EVENT_PREFIX):
        return None
    end = frame.find(b'"', len(EVENT_PREFIX))
    if end < 0:
        return None
    return parse_event_id(frame[len(EVENT_PREFIX) : end].decode("ascii", "replace"))


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client WebSocket text frame (unmasked), reusable for every socket.

    Built once per event per process: the same bytes go to every device of the student.
    """
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


def event_body(event: str, data: dict[str, Any], invalidate: list[str], ts: int) -> bytes:
    """The part of an event frame after its id: what the history keeps.

    Encoded once per notification by the producer, so no gateway process ever re-encodes it.
    """
    return orjson.dumps({"event": event, "data": data, "invalidate": invalidate, "ts": ts})[1:]


def event_frame(event_id: EventId, body: bytes) -> bytes:
    """An event frame from its id and body; the publish function builds the same bytes."""
    return b'{"type":"event","id":"%s",%s' % (str(event_id).encode(), body)


def welcome(user: str, last_id: EventId, recovered: bool) -> str:
    return _text({"type": "welcome", "user": user, "last_id": str(last_id), "recovered": recovered})


def resync(reason: str, last_id: EventId) -> str:
    return _text({"type": "resync", "reason": reason, "last_id": str(last_id)})


PONG = '{"type":"pong"}'


def _text(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed frame of a type this server does not know: newer clients may send it."""


ClientFrame = Ping | Ignored


class ProtocolViolation(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_CLIENT_FRAME_BYTES:
        raise ProtocolViolation(CloseCode.TOO_BIG, f"frame over {MAX_CLIENT_FRAME_BYTES} bytes")
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolViolation(CloseCode.POLICY_VIOLATION, "frame is not JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolViolation(CloseCode.POLICY_VIOLATION, "frame is not a JSON object")
    if frame.get("type") == "ping":
        return Ping()
    return Ignored()
