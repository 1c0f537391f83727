"""A load client light enough not to be the bottleneck: raw asyncio protocols, no tasks.

Each WebSocket is an ``asyncio.Protocol`` that parses only frame headers and, for event
frames, the bench's own send timestamp (``"t":<perf_counter_ns>``, put in ``data`` by the
publisher running in this same process). The publisher writes pre-encoded RESP commands
open-loop on a 1 ms tick and discards the replies. A general-purpose client library would
spend more CPU per frame than the gateway under test.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import hiredis
import orjson

_OP_TEXT, _OP_CLOSE, _OP_PING = 0x1, 0x8, 0x9


@dataclass
class Stats:
    """What every client of one scenario received; latencies in microseconds."""

    events: int = 0
    latencies: list[int] = field(default_factory=list)
    closed: int = 0

    def reset(self) -> None:
        self.events = 0
        self.latencies = []


class Client(asyncio.Protocol):
    def __init__(self, index: int, path: str, stats: Stats) -> None:
        self.index = index
        self._path = path
        self._stats = stats
        self._buffer = b""
        self._upgraded = False
        self.welcome: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {self._path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stats.closed += 1
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("closed before welcome"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.welcome.set_exception(ConnectionError(buffer[:end].decode()))
                assert self.transport is not None
                self.transport.close()
                return
            self._upgraded = True
            buffer = buffer[end + 4 :]
        stats = self._stats
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            opcode = buffer[pos] & 0x0F
            length = buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            pos = end
            if opcode == _OP_TEXT:
                if buffer.startswith(b'{"type":"event"', start):
                    stats.events += 1
                    t = buffer.find(b'"t":', start, end)
                    if t > 0:
                        sent = int(buffer[t + 4 : buffer.find(b"}", t, end)])
                        stats.latencies.append((time.perf_counter_ns() - sent) // 1000)
                elif not self.welcome.done():
                    self.welcome.set_result(orjson.loads(buffer[start:end]))
            elif opcode == _OP_PING:
                self._send(0xA, buffer[start:end])
            elif opcode == _OP_CLOSE:
                assert self.transport is not None
                self.transport.close()
        self._buffer = buffer[pos:]

    def _send(self, opcode: int, payload: bytes) -> None:
        # Client frames must be masked; an all-zero key leaves the payload as it is.
        assert self.transport is not None
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect_many(
    port: int, paths: list[str], stats: Stats, concurrency: int = 200
) -> list[Client]:
    """Open one client per path, ``concurrency`` handshakes at a time; waits for welcomes."""
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, path: str) -> None:
        async with gate:
            _, client = await loop.create_connection(
                lambda: Client(index, path, stats), "127.0.0.1", port
            )
            clients.append(client)
            await asyncio.wait_for(client.welcome, 30)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))
    clients.sort(key=lambda c: c.index)
    return clients


def resp(*args: bytes) -> bytes:
    # hiredis's stub declares a one-element tuple; any number of arguments is fine.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class _Replies(asyncio.Protocol):
    """Counts replies: closing before the last one would make Redis drop unread commands."""

    def __init__(self) -> None:
        self._parser = hiredis.Reader()
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while self._parser.gets() is not False:
            self.count += 1


async def publish_open_loop(
    redis_ports: Sequence[int],
    rate: float,
    seconds: float,
    commands: Callable[[int, int], list[tuple[int, bytes]]],
) -> int:
    """Publish messages at ``rate`` per second for ``seconds``; returns how many were sent.

    Every millisecond ``commands(first, end)`` gives the commands of the messages due, each
    with the index of the port (a cluster's primary) it goes to: one per message, or one
    per batch of them.
    """
    loop = asyncio.get_running_loop()
    links = [await loop.create_connection(_Replies, "127.0.0.1", port) for port in redis_ports]
    sent = issued = 0
    start = time.perf_counter()
    total = int(rate * seconds)
    try:
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            if due > sent:
                batches: list[list[bytes]] = [[] for _ in links]
                for index, packed in commands(sent, due):
                    batches[index].append(packed)
                    issued += 1
                for (transport, _), batch in zip(links, batches, strict=True):
                    if batch:
                        transport.write(b"".join(batch))
                sent = due
            await asyncio.sleep(0.001)
        while sum(replies.count for _, replies in links) < issued:
            await asyncio.sleep(0.001)
    finally:
        for transport, _ in links:
            transport.close()
    return sent
