"""Availability under abuse: what a client can make the gateway hold, with or without a token.

Each test reproduces an attack against a real gateway over raw sockets and checks that the
gateway's memory and file descriptors stay bounded while an honest client is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
from redis.asyncio import Redis
from websockets.frames import Frame, Opcode

from notify.publish import Notification

from ..support import (
    GatewayServer,
    events,
    open_client,
    publisher,
    start_gateway,
    token,
)

ATTACKER = "127.0.0.2"  # another loopback address: per-address limits must not hit honest clients


def address(gateway: GatewayServer) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").split(":")
    return host, int(port)


def upgrade(user: str) -> bytes:
    return (
        f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def test_a_client_that_sends_pings_and_never_reads_is_bounded_then_dropped(
    redis_url: str, student: str
) -> None:
    """Review item 4: each ping is answered with a pong, which a client that never reads
    leaves in the server's buffer; 160k pings grew it by 14 MB, and each ping kept the
    connection alive."""
    async with start_gateway(
        redis_url,
        NOTIFY_SEND_QUEUE_BYTES=str(64 * 1024),
        NOTIFY_PING_INTERVAL="1",
        NOTIFY_PING_TIMEOUT="1",
    ) as gateway:
        reader, writer = await asyncio.open_connection(*address(gateway))
        writer.write(upgrade(student))
        await asyncio.sleep(0.3)
        [sock] = gateway.gateway.sessions
        pings = Frame(Opcode.PING, b"p" * 125).serialize(mask=True) * 1000
        sent, largest = 0, 0
        started = time.monotonic()
        with contextlib.suppress(TimeoutError, ConnectionError):
            while sent < 64 << 20 and time.monotonic() - started < 10:
                writer.write(pings)
                await asyncio.wait_for(writer.drain(), 2)
                sent += len(pings)
                largest = max(largest, sock._transport.get_write_buffer_size())  # type: ignore[union-attr]
        # The server stopped reading once its pongs piled up: the sender is held back by
        # TCP, and what waits in the server stays near the transport's high-water mark.
        assert sent < 32 << 20, f"the server read {sent >> 20} MiB of pings"
        assert largest < 1 << 20, f"{largest} bytes of pongs buffered"
        # It hears nothing from the client any more, so the keepalive drops it.
        deadline = time.monotonic() + 10
        while gateway.gateway.sessions:
            assert time.monotonic() < deadline, "the flooding client was never dropped"
            await asyncio.sleep(0.1)
        writer.close()
        del reader


async def test_half_sent_requests_are_closed_while_an_honest_client_is_served(
    redis_url: str, redis: Redis, student: str
) -> None:
    """Review item 5 (slowloris): a half-sent request was held open indefinitely."""
    async with start_gateway(
        redis_url, NOTIFY_HANDSHAKE_TIMEOUT="2", NOTIFY_CONNECT_RATE="50"
    ) as gateway:
        host, port = address(gateway)
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(300):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            held.append((reader, writer))
        # An honest client, meanwhile, connects and gets its events.
        ws, _ = await open_client(gateway.ws_url(student))
        await publisher(redis).publish(Notification(student, "E"))
        assert [frame["event"] for frame in await events(ws, 1)] == ["E"]
        await ws.close()
        # Past the rate (50/s, bursts of 100) the attacker's connections were refused at
        # once; the others are answered 408 and closed at the deadline.
        answers = [await asyncio.wait_for(reader.read(), 5) for reader, _ in held]
        statuses = [answer.split(b" ")[1] for answer in answers]
        assert set(statuses) == {b"503", b"408"}, set(statuses)
        assert statuses.count(b"408") <= 150
        for _, writer in held:
            writer.close()
        assert gateway.gateway.intake.pending == 0
        metrics = await _metrics(gateway)
        assert 'notify_gateway_connections_refused_total{reason="rate"}' in metrics
        assert 'notify_gateway_connections_refused_total{reason="handshake timeout"}' in metrics


async def test_pending_connections_are_capped_per_process(redis_url: str, student: str) -> None:
    async with start_gateway(
        redis_url,
        NOTIFY_HANDSHAKE_TIMEOUT="2",
        NOTIFY_CONNECT_RATE="0",
        NOTIFY_MAX_PENDING_CONNECTIONS="50",
    ) as gateway:
        host, port = address(gateway)
        held = [
            await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0)) for _ in range(80)
        ]
        await asyncio.sleep(0.2)
        assert gateway.gateway.intake.pending == 50
        refused = [await asyncio.wait_for(reader.read(), 1) for reader, _ in held[50:]]
        assert {answer.split(b" ")[1] for answer in refused} == {b"503"}
        # The cap frees up at the deadline, and an honest client gets in.
        await asyncio.sleep(2.5)
        ws, _ = await open_client(gateway.ws_url(student))
        await ws.close()
        for _, writer in held:
            writer.close()


async def _metrics(gateway: GatewayServer) -> str:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        return (await http.get("/metrics")).text


async def test_a_request_head_over_16_kib_is_answered_400(gateway: GatewayServer) -> None:
    """httptools sets no limit on a request head: the intake does, as h11 did."""
    host, port = address(gateway)

    async def status(header_bytes: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\nConnection: close\r\n\r\n"
            % (b"a" * header_bytes)
        )
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer.split(b" ")[1]

    assert await status(12 * 1024) == b"200"
    assert await status(17 * 1024) == b"400"
    # A head may arrive in pieces: their sizes add up.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(20):
        writer.write(b"X-Pad: %s\r\n" % (b"a" * 1024))
        await writer.drain()
    writer.write(b"\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).split(b" ")[1] == b"400"
    writer.close()
