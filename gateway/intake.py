"""New TCP connections, until they are an upgraded WebSocket or carry a whole request.

uvicorn starts no timer before a request has fully arrived (its keep-alive timer runs only
after a response), and ``NOTIFY_MAX_CONNECTIONS`` counts admitted WebSockets only. Left
alone, anyone could hold file descriptors with half-sent requests (slowloris) without ever
presenting a token. So every connection uvicorn's HTTP protocol serves is counted here and
is given, per process:

- a deadline (``NOTIFY_HANDSHAKE_TIMEOUT``) to deliver a whole request head, from when it
  opened or from its previous response; past it the connection gets 408 and is closed;
- a cap on such connections at once (``NOTIFY_MAX_PENDING_CONNECTIONS``);
- a rate of new connections per client address (``NOTIFY_CONNECT_RATE``, bursts of twice
  that), generous by default since many phones may share one carrier NAT address.

A connection refused by the cap or the rate gets 503 and is closed before anything of it
is parsed. A request head over 16 KiB (its target and headers) gets 400, as uvicorn's h11
parser answered; httptools, several times faster per request, has no such limit of its own.
The protocol class is uvicorn's httptools one, extended at these points only.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from notify.config import GatewaySettings

from .metrics import GatewayMetrics
from .ratelimit import RateLimiter

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: 0\r\n\r\n"
)
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

# The most a request's target and headers may take together.
MAX_HEAD_BYTES = 16 * 1024


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools reports it as a parse error, answered 400."""


class Intake:
    """The connections of one process that have not (yet) delivered a request head."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.deadline = float(settings.handshake_timeout)
        self.max_pending = settings.max_pending_connections
        rate = settings.connect_rate
        self._rate = RateLimiter(rate, 2 * rate) if rate else None
        self._refused = metrics.refused_connections
        self.pending = 0

    def enter(self, client: tuple[str, int] | None) -> str | None:
        """Count a new connection in, or say why it is refused."""
        if self.pending >= self.max_pending:
            return "pending"
        if self._rate is not None and client is not None and not self._rate.allow(client[0]):
            return "rate"
        self.pending += 1
        return None

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def protocol(self) -> type[HttpToolsProtocol]:
        """The HTTP protocol class uvicorn instantiates, counting into this intake."""
        return type("GuardedHttpToolsProtocol", (_Guarded,), {"intake": self})


class _Guarded(HttpToolsProtocol):
    intake: ClassVar[Intake]
    _counted = False
    _timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        refusal = self.intake.enter(self.client)
        if refusal is not None:
            self.intake.refused(refusal)
            transport.write(_REFUSED)
            transport.close()
            return
        self._counted = True
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's keep-alive timer stops at the first byte of the next request; the
        # deadline covers the rest of its head too.
        self._arm()

    def handle_websocket_upgrade(self) -> None:
        self._leave()  # a WebSocket now: counted by the gateway, kept alive by its pings
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._leave()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.intake.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._counted or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a request in hand: the application answers it
        self.intake.refused("handshake timeout")
        self.transport.write(_TIMED_OUT)
        self.transport.close()

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.intake.pending -= 1
