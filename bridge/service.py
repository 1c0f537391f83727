"""The bridge process: the consumer and its probe server, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

from notify.config import BridgeSettings

from . import probes
from .consumer import Bridge
from .rules import Rule


async def run(settings: BridgeSettings, rule_set: dict[str, Rule]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bridge = Bridge(settings, rule_set)
    probe_server = probes.server(bridge, settings.host, settings.port)
    serving = asyncio.create_task(probe_server.serve())
    try:
        # Returns once ``stop`` is set and the batch in hand is finished.
        await bridge.run(stop)
    finally:
        probe_server.should_exit = True
        await serving
