"""The WebSocket I/O layer: one client's TCP connection once uvicorn saw its upgrade request.

uvicorn parses HTTP and hands every upgraded connection to this protocol (``Config(ws=...)``),
so Starlette keeps serving the HTTP API on the same port while ``/ws`` skips ASGI: its
per-message coroutine hand-offs cost more than everything else a push does
(docs/performance.md). websockets' sans-I/O ``ServerProtocol`` does the handshake, parses
client frames and runs the closing handshake; server frames are not masked, so an event's
frame is built once per process (:func:`notify.protocol.text_frame`) and the same bytes are
written to every socket that gets it.

The socket knows the layer above only through :class:`SessionHandler` (who may connect,
what a connection starts with, who left) and :class:`Peer` (the session it serves).

Writes go straight to the transport while it accepts them, without a task per connection.
Once the kernel buffer and the transport's own buffer fill up (a client not reading), frames
wait in ``_pending``; live frames count against the connection's byte budget and the
connection is closed with 4008 past it. Meanwhile the socket stops reading the client: what
the client sends may cause writes (websockets answers each ping with a pong, a ``ping``
message gets a ``pong``), so a client that sends without reading would otherwise grow the
transport's buffer without bound. With reading paused it can send nothing more, and the
keepalive, which hears nothing from it, drops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Protocol, cast

import orjson
from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from notify import logs, protocol
from notify.protocol import CloseCode, ProtocolViolation

from .schema import ApiError

# Its DEBUG records (websockets') show request headers, and the handshake line the query
# string: both may carry a token.
log = logs.redacted(logging.getLogger(__name__))

# How long a close frame may wait for a client that does not read, or for the client's
# answering close; then the TCP connection is dropped without it.
CLOSE_TIMEOUT = 10.0
PING_FRAME = Frame(Opcode.PING, b"").serialize(mask=False)


@dataclass(frozen=True, slots=True)
class Admission:
    """A handshake the handler accepted: who connects, until when, and from where on."""

    user: str
    expires_at: float
    since: str | None
    # An operator's console watching the student, not one of the student's devices.
    watch: bool = False


class Peer(Protocol):
    """The session a socket serves (:class:`.session.Session`)."""

    @property
    def closing(self) -> bool: ...

    def send(self, message: str) -> None: ...

    def close(self, code: CloseCode, reason: str = "") -> None: ...


class SessionHandler(Protocol):
    """What the socket asks of the gateway (:class:`.app.Gateway`)."""

    async def admit(self, request: Request) -> Response | Admission:
        """Check an upgrade request; a refusal is an HTTP response sent instead."""

    async def open(self, socket: Socket, admission: Admission) -> Peer | None:
        """Start the session (welcome, catch-up); None if it was refused."""

    def leave(self, socket: Socket) -> None:
        """The connection is gone."""


class WriteBatch:
    """Joins the frames written to each socket between ``begin`` and ``end`` into one write.

    Under load one read of the Pub/Sub connection holds many messages; a socket that gets
    several of them (a broadcast, a busy student) then costs one system call, not one each.
    """

    def __init__(self) -> None:
        self.active = False
        self._corked: list[Socket] = []

    def begin(self) -> None:
        self.active = True

    def cork(self, socket: Socket) -> None:
        self._corked.append(socket)

    def end(self) -> None:
        self.active = False
        corked, self._corked = self._corked, []
        for socket in corked:
            socket.uncork()


def refusal(status: int, code: str, message: str) -> Response:
    """An HTTP error with the API's JSON error body, sent instead of the upgrade."""
    body = orjson.dumps(ApiError(status, code, message).body())
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)


class Socket(asyncio.Protocol):
    """The transport side of one student's WebSocket; the session decides what to send."""

    # Set by :func:`bind`: uvicorn instantiates the protocol class itself.
    handler: ClassVar[SessionHandler]
    batch: ClassVar[WriteBatch]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any]):
        # uvicorn closes everything in server_state.connections on shutdown (1012).
        self._registry = server_state.connections
        self._ws = ServerProtocol(max_size=protocol.MAX_CLIENT_FRAME_BYTES, logger=log)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[tuple[bytes, int]] = deque()
        self.charged = 0
        # The transport's buffer is past its high-water mark (the client is not reading).
        self._paused = False
        # Whether the transport reads: not until the welcome is queued, not while paused.
        self._reading = True
        # Frames held for one write while the hub's WriteBatch is active.
        self._corked: list[bytes] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._started: asyncio.Task[None] | None = None
        # Fragments of a client message split over several frames (rare: clients send
        # small frames whole), bounded by ServerProtocol's max_size.
        self._fragments: list[bytes] | None = None
        self.session: Peer | None = None
        # Keepalive, driven by the gateway's sweep (no timer per connection).
        self.ping_sent_at = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._registry.add(self)  # type: ignore[arg-type]  # uvicorn only calls shutdown()

    def data_received(self, data: bytes) -> None:
        self.ping_sent_at = 0.0  # any traffic proves the client alive
        self._ws.receive_data(data)
        for event in self._ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush_protocol()

    def eof_received(self) -> bool | None:
        self._ws.receive_eof()
        self._flush_protocol()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._started is not None:
            self._started.cancel()
        self._pending.clear()
        self._corked = None
        if self.session is not None:
            self.handler.leave(self)

    def pause_writing(self) -> None:
        self._paused = True
        self._read_if_allowed()

    def resume_writing(self) -> None:
        self._paused = False
        transport = self._transport
        assert transport is not None
        while self._pending and not self._paused:
            frame, charge = self._pending.popleft()
            self.charged -= charge
            transport.write(frame)
        self._read_if_allowed()

    # What the connection and the gateway ask of the socket

    def send(self, frame: bytes, charge: int, limit: int) -> bool:
        """Write ``frame`` now or queue it; False (nothing queued) if it would pass ``limit``.

        Once the closing handshake started (whoever started it) frames are dropped: nothing
        may follow a close frame, and the client resumes them from history.
        """
        if self._ws.state is not State.OPEN:
            return True
        if not self._paused and not self._pending:
            batch = self.batch
            if batch.active:
                if self._corked is None:
                    self._corked = []
                    batch.cork(self)
                self._corked.append(frame)
            else:
                assert self._transport is not None
                self._transport.write(frame)
            return True
        if self.charged + charge > limit:
            return False
        self._pending.append((frame, charge))
        self.charged += charge
        return True

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self._transport is not None and not self._transport.is_closing():
            self._transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Send a close frame ahead of anything queued (history has what is dropped)."""
        if self._ws.state is State.OPEN:
            self._ws.send_close(code, reason)
            self._flush_protocol()

    def _drop_queued(self) -> None:
        self._pending.clear()
        self.charged = 0
        self._corked = None

    def ping(self, now: float) -> None:
        if self._ws.state is State.OPEN:
            self.ping_sent_at = now
            assert self._transport is not None
            self._transport.write(PING_FRAME)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the client to come back (1012) and drop the connection."""
        if self.session is not None:
            self.session.close(CloseCode.SERVICE_RESTART)
        else:
            self.close(CloseCode.SERVICE_RESTART)
        if self._transport is not None:
            self._transport.close()

    # Internals

    def _handshake(self, request: Request) -> None:
        # Checking the token may fetch signing keys; client frames wait meanwhile, and
        # until the welcome is queued: it must be the first frame.
        self._started = asyncio.get_running_loop().create_task(self._start(request))
        self._read_if_allowed()

    async def _start(self, request: Request) -> None:
        try:
            admission = await self._admit(request)
            if admission is not None:
                self.session = await self.handler.open(self, admission)
        except Exception:
            # Never leave an upgraded socket silent, without a welcome: drop it, the client
            # reconnects and resumes.
            log.exception("a connection failed to start")
            self.abort()
            return
        finally:
            self._started = None
        self._read_if_allowed()

    async def _admit(self, request: Request) -> Admission | None:
        """Answer the upgrade request: 101, or a refusal (then None)."""
        try:
            admission = await self.handler.admit(request)
        except Exception:
            log.exception("refusing a WebSocket handshake that could not be checked")
            admission = refusal(400, "bad_request", "the upgrade request could not be read")
        response = admission if isinstance(admission, Response) else self._ws.accept(request)
        self._ws.send_response(response)
        self._flush_protocol()
        if self._transport is not None:
            log.info(
                '%s - "WebSocket %s" %d',
                _peer(self._transport),
                logs.redact_url(request.path),
                response.status_code,
            )
        if isinstance(admission, Response) or response.status_code != 101:
            return None
        return admission

    def _read_if_allowed(self) -> None:
        transport = self._transport
        reading = self._started is None and not self._paused
        if reading is self._reading or transport is None or transport.is_closing():
            return
        self._reading = reading
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _frame(self, frame: Frame) -> None:
        """Collect a client message from its frames; control frames are websockets' job."""
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            fragments: list[bytes] = []
        elif frame.opcode is Opcode.CONT and self._fragments is not None:
            fragments = self._fragments
        else:
            return
        fragments.append(bytes(frame.data))
        if frame.fin:
            self._fragments = None
            self._client_message(b"".join(fragments))
        else:
            self._fragments = fragments

    def _client_message(self, data: bytes | bytearray | memoryview) -> None:
        session = self.session
        if session is None or session.closing:
            return
        try:
            frame = protocol.parse_client_frame(bytes(data))
        except ProtocolViolation as exc:
            session.close(exc.code)
            return
        if isinstance(frame, protocol.Ping):
            session.send(protocol.PONG)

    def _flush_protocol(self) -> None:
        """Write what websockets produced (handshake, pong, close); close TCP when it says."""
        transport = self._transport
        if transport is None:
            return
        self.uncork()  # frames already sent go out before a pong or close
        for data in self._ws.data_to_send():
            if data:
                transport.write(data)
            else:
                transport.close()  # websockets' end of stream
        if self._ws.state is not State.OPEN:
            # A close frame went out (or came in): nothing may follow it. Every change of
            # state goes through here, so this is the one place the queues are dropped.
            self._drop_queued()
        if self._ws.close_expected() and self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"


def bind(handler: SessionHandler, batch: WriteBatch) -> type[Socket]:
    """The protocol class uvicorn instantiates, tied to one gateway's handler and batch."""
    return type("GatewaySocket", (Socket,), {"handler": handler, "batch": batch})
