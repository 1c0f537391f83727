"""Concurrent API publishes share function calls.

A publish request costs the gateway a Redis round trip through redis-py and Redis a
function call, each more than the notification itself once requests come by the thousand
(docs/performance.md). So requests queue here, and one task publishes whatever has queued
in one call while the next requests queue behind it: a lone request goes out at once,
and under load each round trip carries every request that arrived during the previous
one. A request's notifications always go in one call (on a single Redis, published whole
or not at all), so a batch grows only while it stays within the function's call size.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from notify.publish import CALL_SIZE, Notification, Published, Publisher

Results = list[Published | Exception]


class Coalescer:
    def __init__(self, publisher: Publisher, limit: int = CALL_SIZE) -> None:
        self._publisher = publisher
        self._limit = limit
        self._queue: deque[tuple[Sequence[Notification], asyncio.Future[Results]]] = deque()
        self._sending: asyncio.Task[None] | None = None

    async def publish(self, notifications: Sequence[Notification]) -> Results:
        """What :meth:`Publisher.invalidate_then_publish` says of ``notifications``; raises
        what failed the call they went out in."""
        future: asyncio.Future[Results] = asyncio.get_running_loop().create_future()
        self._queue.append((notifications, future))
        if self._sending is None:
            self._sending = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._queue:
                await self._send_one(self._take())
        finally:
            self._sending = None
            # Cancelled (the gateway is stopping): nobody is left to send what queued.
            while self._queue:
                _notifications, future = self._queue.popleft()
                if not future.done():
                    future.set_exception(RuntimeError("the gateway is stopping"))

    def _take(self) -> list[tuple[Sequence[Notification], asyncio.Future[Results]]]:
        batch = [self._queue.popleft()]
        size = len(batch[0][0])
        while self._queue and size + len(self._queue[0][0]) <= self._limit:
            batch.append(self._queue.popleft())
            size += len(batch[-1][0])
        return batch

    async def _send_one(
        self, batch: list[tuple[Sequence[Notification], asyncio.Future[Results]]]
    ) -> None:
        every = [n for notifications, _future in batch for n in notifications]
        try:
            sent = await self._publisher.invalidate_then_publish((), every)
        except BaseException as exc:
            for _notifications, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for notifications, future in batch:
            end = start + len(notifications)
            # A request whose client left meanwhile was cancelled: what it sent is published.
            if not future.done():
                future.set_result(sent.results[start:end])
            start = end
