"""The gateway's ASGI application: ``/ws`` for students, probes for the platform."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .. import protocol, redis_client
from ..broker import Publisher
from ..config import GatewaySettings
from ..protocol import CloseCode, ProtocolViolation
from . import api
from .auth import AuthError, TokenVerifier, bearer
from .connection import Connection
from .hub import Hub, JoinRefused
from .metrics import GatewayMetrics
from .presence import PresenceWriter
from .reader import Reader

log = logging.getLogger(__name__)

# History reads in flight at once per process (resumes and catch-ups).
HISTORY_READ_CONCURRENCY = 64


class Gateway:
    """Everything one gateway process shares between its connections."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.process_id = secrets.token_hex(6)
        self.redis = redis_client.client(settings.redis_url)
        self.reader = Reader(settings.redis_url, f"notify:probe:{self.process_id}")
        self.presence = PresenceWriter(
            self.redis,
            self.process_id,
            settings.presence_ttl,
            lambda user: self.hub.connections(user),
        )
        self.metrics = GatewayMetrics(lambda: self.hub.connection_count)
        self.hub = Hub(
            self.reader, settings.max_connections_per_user, self.presence.changed, self.metrics
        )
        self.verifier = TokenVerifier(settings.jwt)
        self.history_reads = asyncio.Semaphore(HISTORY_READ_CONCURRENCY)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.reader.run()),
            asyncio.create_task(self.reader.probe(self.redis)),
            asyncio.create_task(self.presence.run()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.presence.withdraw()
        await self.reader.close()
        await self.redis.aclose()

    async def serve(self, websocket: WebSocket) -> None:
        if self.hub.connection_count >= self.settings.max_connections:
            await self._deny(websocket, 503, "overloaded", CloseCode.TRY_AGAIN_LATER)
            return
        token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get(
            "token"
        )
        try:
            if token is None:
                raise AuthError("missing token")
            claims = self.verifier.verify(token)
        except AuthError as exc:
            await self._deny(websocket, 401, str(exc), CloseCode.UNAUTHORIZED)
            return
        await websocket.accept()
        conn = Connection(
            websocket,
            claims.user_id,
            self.redis,
            self.settings.send_queue_bytes,
            self.history_reads,
            self.metrics,
        )
        try:
            await self.hub.join(conn)
        except JoinRefused as exc:
            await websocket.close(exc.code, exc.reason)
            return
        writer = asyncio.create_task(conn.write_loop())
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, claims.expires_at - time.time()), conn.close, CloseCode.TOKEN_EXPIRED
        )
        try:
            await conn.start(websocket.query_params.get("since"))
            await self._receive(websocket, conn, writer)
        except RedisError as exc:
            log.warning("history unavailable, closing a connection: %s", exc)
            conn.close(CloseCode.TRY_AGAIN_LATER)
            await writer
        finally:
            expiry.cancel()
            self.hub.leave(conn)
            conn.stop()
            writer.cancel()
            # A writer that failed on a dead socket has nothing more to say.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer

    @staticmethod
    async def _deny(websocket: WebSocket, status: int, reason: str, fallback: CloseCode) -> None:
        """An HTTP error before the upgrade; a close code where the server cannot send one."""
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            code = "unauthorized" if status == 401 else "unavailable"
            await websocket.send_denial_response(
                JSONResponse({"error": {"code": code, "message": reason, "field": None}}, status)
            )
        else:
            await websocket.accept()
            await websocket.close(fallback, reason)

    async def _receive(
        self, websocket: WebSocket, conn: Connection, writer: asyncio.Task[None]
    ) -> None:
        """Answer client frames until the client leaves or the writer closes the socket."""
        while not writer.done():
            receive = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({receive, writer}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                return
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return
            try:
                frame = protocol.parse_client_frame(
                    message.get("text") or message.get("bytes") or b""
                )
            except ProtocolViolation as exc:
                conn.close(exc.code)
                await writer
                return
            if isinstance(frame, protocol.Ping):
                conn.send(protocol.PONG)


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

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(_request: Request) -> Response:
        registry = gateway.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def readyz(_request: Request) -> Response:
        ready = gateway.reader.delivering
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    app = Starlette(
        routes=[
            WebSocketRoute("/ws", gateway.serve),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *api.Api(settings, gateway.redis, Publisher(gateway.redis, settings.history)).routes(),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
