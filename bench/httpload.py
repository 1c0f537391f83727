"""An open-loop HTTP/1.1 load client for the API scenario, with its own latency counts.

Each connection keeps at most one request in flight (no pipelining, as real clients send);
requests due while every connection is busy wait in order, and their wait counts in their
latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class _Connection(asyncio.Protocol):
    def __init__(self, done: asyncio.Queue[_Connection], latencies: list[int]) -> None:
        self._done = done
        self._latencies = latencies
        self._buffer = b""
        self._sent_at = 0
        self.transport: asyncio.Transport | None = None
        self.failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._done.put_nowait(self)

    def send(self, request: bytes, queued_at: int) -> None:
        self._sent_at = queued_at
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self._buffer[:head_end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self._buffer) < head_end + 4 + length:
            return
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 202")):
            self.failures += 1
        self._buffer = self._buffer[head_end + 4 + length :]
        self._latencies.append((time.perf_counter_ns() - self._sent_at) // 1000)
        self._done.put_nowait(self)


async def post_open_loop(
    port: int, path: str, headers: dict[str, str], bodies: list[bytes], rate: float,
    connections: int = 100,
) -> tuple[list[int], int]:  # fmt: skip
    """POST ``bodies`` in turn at ``rate`` per second; latencies (µs) and failures."""
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    latencies: list[int] = []
    links = [
        await loop.create_connection(lambda: _Connection(idle, latencies), "127.0.0.1", port)
        for _ in range(connections)
    ]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    requests = [
        f"POST {path} HTTP/1.1\r\nHost: bench\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        .encode() + body
        for body in bodies
    ]  # fmt: skip
    waiting: deque[int] = deque()
    start = time.perf_counter()
    deadline = start + len(requests) / rate + 30
    sent = 0
    try:
        while (sent < len(requests) or len(latencies) < len(requests)) and (
            time.perf_counter() < deadline
        ):
            due = min(len(requests), int((time.perf_counter() - start) * rate) + 1)
            now = time.perf_counter_ns()
            waiting.extend([now] * (due - sent - len(waiting)))
            while waiting and not idle.empty():
                connection = idle.get_nowait()
                connection.send(requests[sent], waiting.popleft())
                sent += 1
            await asyncio.sleep(0.0005)
    finally:
        for transport, _ in links:
            transport.close()
    return latencies, sum(link.failures for _, link in links)
