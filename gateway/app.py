"""One gateway process: the composition root that wires its parts, and its HTTP application.

The parts point one way: the Pub/Sub reader (:mod:`.pubsub`) reports to a listener, the
hub; the hub fans frames out to sessions (:mod:`.session`); each session writes to its
socket (:mod:`.ws`), which reports back through a handler interface. :class:`Gateway`
builds them, registers each with the one below, and is that handler: it decides who may
connect (:meth:`Gateway.admit`) and what a connection starts with (:meth:`Gateway.open`).
``/ws`` is served by :mod:`.ws` straight from uvicorn's upgrade (see there why); the
Starlette application serves the probes, metrics and the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.responses import Response as HttpResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.http11 import Request, Response

from notify import redis_client
from notify.config import GatewaySettings
from notify.incarnation import Durability
from notify.keys import Keys
from notify.protocol import CloseCode
from notify.publish import Publisher

from . import api, assets
from .auth import AuthError, KeysUnavailable, TokenVerifier, bearer
from .history import HistoryReader
from .hub import Hub, JoinRefused
from .intake import Intake
from .metrics import GatewayMetrics
from .presence import PresenceWriter
from .pubsub.reader import Reader
from .session import STARTING, Session
from .ws import Admission, Socket, WriteBatch, refusal

log = logging.getLogger(__name__)

# History reads in flight at once per process (resumes and catch-ups).
HISTORY_READ_CONCURRENCY = 64


class Gateway:
    """Everything one gateway process shares between its connections."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.process_id = secrets.token_hex(6)
        self.redis = redis_client.client(settings.redis.url, settings.redis.cluster)
        self.keys = Keys(settings.redis.namespace)
        durability = Durability(self.redis)
        self.publisher = Publisher(self.redis, self.keys, settings.history, durability)
        self.metrics = GatewayMetrics(lambda: self.hub.connection_count)
        self.intake = Intake(settings, self.metrics)
        self.reader = Reader(self.redis, settings.redis.url, self.keys, self.process_id)
        self.presence = PresenceWriter(
            self.redis, self.keys, self.process_id, settings.presence_ttl, self._connections
        )
        # Frames for one socket from one read of the Pub/Sub connection go out in one write:
        # the hub begins the batch, the reader's end of a read flushes it.
        self.batch = WriteBatch()
        self.hub = Hub(
            self.reader,
            self.keys,
            self.batch,
            settings.max_connections_per_user,
            self.presence.changed,
            self.metrics,
        )
        self.reader.attach(self.hub)
        self.verifier = TokenVerifier(settings.jwt)
        self.history = HistoryReader(
            self.redis, self.keys, durability, settings.history, HISTORY_READ_CONCURRENCY
        )
        # Every socket with a session, and its session (the keepalive sweeps them).
        self.sessions: dict[Socket, Session] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def _connections(self, user: str) -> int:
        return self.hub.connections(user)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.reader.run()),
            asyncio.create_task(self.reader.probe()),
            asyncio.create_task(self.presence.run()),
            asyncio.create_task(self.keepalive()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # A task that failed has logged why; shutdown goes on regardless.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.presence.withdraw()
        self.reader.close()
        await self.redis.aclose()

    async def admit(self, request: Request) -> Response | Admission:
        """Check an upgrade request; a refusal is an HTTP response sent before the upgrade."""
        path, _, query = request.path.partition("?")
        if path != "/ws":
            return refusal(404, "not_found", "the WebSocket endpoint is /ws")
        if self.hub.connection_count >= self.settings.max_connections:
            return refusal(503, "unavailable", "overloaded")
        params = parse_qs(query)
        authorization = request.headers.get_all("Authorization")
        if len(authorization) > 1:
            return refusal(401, "unauthorized", "several Authorization headers")
        token = bearer(authorization[0] if authorization else None) or _first(params, "token")
        try:
            if token is None:
                raise AuthError("missing token")
            claims = await self.verifier.verify(token)
        except AuthError as exc:
            return refusal(401, "unauthorized", str(exc))
        except KeysUnavailable as exc:
            log.warning("refusing a connection: %s", exc)
            return refusal(503, "unavailable", "signing keys unavailable, retry later")
        return Admission(claims.user_id, claims.expires_at, _first(params, "since"), claims.watch)

    async def open(self, socket: Socket, admission: Admission) -> Session | None:
        """Join the hub and queue welcome and catch-up; the socket is open from here on."""
        session = Session(
            socket,
            admission.user,
            self.history,
            self.settings.send_queue_bytes,
            self.metrics,
            admission.watch,
        )
        try:
            await self.hub.join(session)
        except JoinRefused as exc:
            socket.close(exc.code, exc.reason)
            return None
        self.sessions[socket] = session
        session.expiry = asyncio.get_running_loop().call_later(
            max(0.0, admission.expires_at - time.time()), session.close, CloseCode.TOKEN_EXPIRED
        )
        try:
            await session.start(admission.since)
        except redis_client.UNAVAILABLE as exc:
            log.warning("history unavailable, closing a connection: %s", exc)
            session.close(CloseCode.TRY_AGAIN_LATER)
        except BaseException:
            self.leave(socket)  # the client left during the start
            raise
        return session

    def leave(self, socket: Socket) -> None:
        session = self.sessions.pop(socket, None)
        if session is not None:
            self.hub.leave(session)
            session.stop()

    async def keepalive(self) -> None:
        """Ping every socket each interval; drop those silent for ping_timeout after a ping.

        One sweep for the whole process instead of two timers per connection; a dead
        client is dropped between ping_timeout and ping_interval + ping_timeout after its
        last ping.
        """
        loop = asyncio.get_running_loop()
        timeout = self.settings.ping_timeout
        while True:
            await asyncio.sleep(self.settings.ping_interval)
            now = loop.time()
            try:
                for socket, session in list(self.sessions.items()):
                    if session.phase is STARTING:
                        # Its reading is paused until the welcome is queued: a ping whose
                        # pong cannot be read would drop it.
                        continue
                    if not socket.ping_sent_at:
                        socket.ping(now)
                    elif now - socket.ping_sent_at >= timeout:
                        socket.abort()
            except Exception:
                # One bad socket must not end dead-client detection for the process.
                log.exception("keepalive sweep failed")


class _App(Starlette):
    """Starlette, with ``POST /api/publish`` answered ahead of its middleware and router.

    At thousands of requests a second those cost a fifth of a publish request
    (docs/performance.md). A failure there is still answered by Starlette's
    ServerErrorMiddleware: a 500, logged.
    """

    def __init__(self, *, publish: ASGIApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._publish = ServerErrorMiddleware(publish)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = scope["type"] == "http"
        if http and scope["path"] == "/api/publish" and scope["method"] == "POST":
            await self._publish(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _first(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def create_app(settings: GatewaySettings) -> Starlette:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        # On SIGTERM uvicorn stops accepting and closes every WebSocket with 1012 before
        # this shutdown half runs; clients reconnect elsewhere and resume.
        try:
            yield
        finally:
            await gateway.stop()

    async def healthz(_request: HttpRequest) -> HttpResponse:
        return JSONResponse({"status": "ok"})

    async def metrics(_request: HttpRequest) -> HttpResponse:
        registry = gateway.metrics.registry
        return HttpResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(_request: HttpRequest) -> HttpResponse:
        ready = gateway.reader.delivering
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    http_api = api.Api(settings, gateway.redis, gateway.keys, gateway.publisher, gateway.metrics)
    app = _App(
        publish=http_api.publish,
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *http_api.routes(),
            *assets.routes(),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
