"""A work loop as a process: the loop and its probe server, until SIGTERM or SIGINT.

The bridge's consumer and the outbox relay both run this way: on the signal the loop
finishes the batch in hand (and commits it) before the probes go away.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Protocol

from . import probes


class Worker(probes.Probed, Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


async def run(make: Callable[[], Worker], host: str, port: int) -> None:
    """Run the worker ``make`` builds (in the event loop: aiokafka's clients need it)."""
    worker = make()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    probe_server = probes.server(worker, host, port)
    serving = asyncio.create_task(probe_server.serve())
    try:
        # Returns once ``stop`` is set and the batch in hand is finished.
        await worker.run(stop)
    finally:
        probe_server.should_exit = True
        await serving
