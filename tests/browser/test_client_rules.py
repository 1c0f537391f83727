"""The JS client's rules in a real browser: position, backoff windows, tokens, ping.

A scripted fake socket (client_rules.js) drives the module as the gateway serves it, so
each close code of docs/protocol.md is checked in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playwright.async_api import Page

from ..support import GatewayServer

SCRIPT = Path(__file__).with_name("client_rules.js")


async def test_client_follows_the_close_code_table(gateway: GatewayServer, page: Page) -> None:
    await page.goto(f"{gateway.url}/healthz")  # the gateway's origin, to import the module
    result: dict[str, Any] = await page.evaluate(SCRIPT.read_text())

    assert result["firstUrl"] == "ws://gateway.test/ws"
    assert result["storedWhileApplying"] == "e-5"
    assert result["socketsWhileApplying"] == 1
    assert result["storedAfterApplying"] == "e-6"
    assert result["applied"] == ["e-6"]
    assert result["resumeUrl"] == "ws://gateway.test/ws?since=e-6"
    # Math.random() is 0.999: each full-jitter delay is the top of its window.
    *jittered, slow = result["delays"]
    windows = [(d["code"], round(d["delay"] / 0.999)) for d in jittered]
    assert windows == [(1011, 100), (1011, 200), (1012, 100), (4001, 100)]
    # 1008: from half of maxDelayMs to all of it, never fast.
    assert slow["code"] == 1008
    assert 500 <= slow["delay"] <= 1000
    assert result["tokens"] == ["token-1"] * 4 + ["token-2"] * 2  # renewed after 4001
    assert result["closedOnStop"] == 1000
    assert result["pingSent"] == [{"type": "ping"}]
    assert result["quietClosedWith"] == 4000
