"""Helpers shared by the integration tests: an in-process gateway and WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import orjson
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from gateway.app import Gateway, create_app
from gateway.auth import mint
from gateway.server import uvicorn_config
from notify import config, embedded
from notify.incarnation import Durability
from notify.keys import Keys
from notify.publish import Publisher
from notify.redis_client import Client

JWT_SECRET = "test-secret-" + "x" * 32
# An operator's key, and a backend publisher's.
API_KEY = "test-api-key-0123456789"
PUBLISHER_KEY = "test-publisher-key-0123456789"
# The names of a deployment with the default namespace (database 0).
KEYS = Keys()


def publisher(redis: Client, size: int = 100, keys: Keys = KEYS) -> Publisher:
    """The publish contract as the services build it, keeping ``size`` events per student."""
    history = replace(config.load_history({}), size=size)
    return Publisher(redis, keys, history, Durability(redis))


def settings_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "NOTIFY_JWT_SECRET": JWT_SECRET,
        "NOTIFY_API_KEYS": f"tests:operator={API_KEY},backend={PUBLISHER_KEY}",
        "NOTIFY_HOST": "127.0.0.1",
        **extra,
    }


def token(user: str, ttl: int = 3600) -> str:
    return mint(config.load_jwt(settings_env("redis://unused")), user, ttl)


@dataclass
class GatewayServer:
    url: str
    gateway: Gateway

    def ws_url(self, user: str | None = None, since: str | None = None, **params: str) -> str:
        query = dict(params)
        if user is not None:
            query["token"] = token(user)
        if since is not None:
            query["since"] = since
        suffix = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{self.url.replace('http', 'ws', 1)}/ws" + (f"?{suffix}" if suffix else "")


@contextlib.asynccontextmanager
async def start_gateway(redis_url: str, **extra: str) -> AsyncIterator[GatewayServer]:
    """A real gateway (uvicorn, websockets-sansio) in this event loop on a free port."""
    port = embedded.free_port()
    settings = config.load_gateway(settings_env(redis_url, PORT=str(port), **extra))
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    gateway: Gateway = app.state.gateway
    await asyncio.wait_for(gateway.reader.connected.wait(), 5)
    try:
        yield GatewayServer(f"http://127.0.0.1:{port}", gateway)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    doc: dict[str, Any] = orjson.loads(frame)
    return doc


async def open_client(url: str) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect and return the socket with its welcome frame."""
    ws = await connect(url)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def events(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Exactly ``count`` frames; fails if they do not all arrive in time."""
    frames: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(frames) < count:
        frames.append(await recv_json(ws, max(0.01, deadline - loop.time())))
    return frames


async def nothing_arrives(ws: ClientConnection, within: float = 0.5) -> None:
    with contextlib.suppress(TimeoutError):
        frame = await asyncio.wait_for(ws.recv(), within)
        raise AssertionError(f"unexpected frame: {frame!r}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def produce(
    bootstrap: str, topic: str, events: list[dict[str, Any] | bytes], key: str | None = None
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for event in events:
            value = event if isinstance(event, bytes) else orjson.dumps(event)
            await producer.send_and_wait(topic, value, key=None if key is None else key.encode())
    finally:
        await producer.stop()


def domain_event(event_type: str, event_id: str | None = None, **data: Any) -> dict[str, Any]:
    return {
        "eventId": event_id or unique("evt"),
        "eventType": event_type,
        "occurredAt": "2026-11-21T10:00:00+00:00",
        "data": data,
    }


class TcpProxy:
    """A loopback TCP proxy the test controls: a server "down" without losing its data.

    ``upstream`` may be changed at any time (a failover behind a load balancer): new
    connections go to the new one. ``drop_reply_to``: the next connection that sends data
    containing these bytes is dropped as soon as the server answers, the answer unsent (a
    reply lost with its connection after the command ran).
    """

    def __init__(self, port: int, upstream: int) -> None:
        self.port, self.upstream = port, upstream
        self.drop_reply_to: bytes | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        # One per open connection: set, its client's bytes go nowhere.
        self._holds: set[asyncio.Event] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        doomed, held = asyncio.Event(), asyncio.Event()
        self._holds.add(held)
        for pipe in (
            self._pipe(reader, up_writer, watch=doomed, held=held),
            self._pipe(up_reader, writer, unless=doomed, partner=up_writer),
        ):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)
        task.add_done_callback(lambda _: self._holds.discard(held))

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        watch: asyncio.Event | None = None,
        unless: asyncio.Event | None = None,
        partner: asyncio.StreamWriter | None = None,
        held: asyncio.Event | None = None,
    ) -> None:
        try:
            while data := await src.read(65536):
                if held is not None and held.is_set():
                    continue
                if watch is not None and self.drop_reply_to and self.drop_reply_to in data:
                    self.drop_reply_to = None
                    watch.set()
                if unless is not None and unless.is_set():
                    assert partner is not None
                    partner.close()
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def cut(self) -> None:
        """Refuse new connections and break every open one."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._pipes):
            task.cancel()

    def stall(self) -> None:
        """Every open connection stops passing its client's requests on, as a server that
        hangs on them; the client has to give up and reconnect (new connections pass)."""
        for held in self._holds:
            held.set()

    async def restore(self) -> None:
        await self.start()


def wait_ready(url: str, within: float = 20) -> None:
    """Block until a gateway (or bridge) process at ``url`` answers /readyz with 200."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} not ready within {within:.0f} s"
            time.sleep(0.1)
