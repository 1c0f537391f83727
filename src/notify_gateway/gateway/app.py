"""The gateway's ASGI application: ``/ws`` for students, probes for the platform."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .. import protocol
from ..config import GatewaySettings
from ..protocol import CloseCode, ProtocolViolation
from .auth import AuthError, TokenVerifier, bearer
from .connection import Connection
from .hub import Hub, JoinRefused
from .reader import Reader

log = logging.getLogger(__name__)

MAX_CONNECTIONS_PER_USER = 10


class Gateway:
    """Everything one gateway process shares between its connections."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url)
        self.reader = Reader(settings.redis_url)
        self.hub = Hub(self.reader, MAX_CONNECTIONS_PER_USER)
        self.verifier = TokenVerifier(settings.jwt)
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reader_task = asyncio.create_task(self.reader.run())

    async def stop(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        await self.reader.close()
        await self.redis.aclose()

    async def serve(self, websocket: WebSocket) -> None:
        token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get(
            "token"
        )
        try:
            if token is None:
                raise AuthError("missing token")
            claims = self.verifier.verify(token)
        except AuthError as exc:
            await self._refuse(websocket, str(exc))
            return
        await websocket.accept()
        conn = Connection(websocket, claims.user_id, self.redis, self.settings.send_queue_bytes)
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

    @staticmethod
    async def _refuse(websocket: WebSocket, reason: str) -> None:
        """HTTP 401 before the upgrade; 4401 after it where the server cannot answer HTTP."""
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(
                JSONResponse({"error": {"code": "unauthorized", "message": reason}}, 401)
            )
        else:
            await websocket.accept()
            await websocket.close(CloseCode.UNAUTHORIZED, reason)

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

    async def readyz(_request: Request) -> Response:
        ready = gateway.reader.connected.is_set()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    app = Starlette(
        routes=[
            WebSocketRoute("/ws", gateway.serve),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
