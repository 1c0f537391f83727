"""The JS client in a real browser: the connection drops, and no event is missed.

The page is served on the gateway's origin through a TCP proxy the test cuts: the browser
sees the connection drop (1006) and its reconnects refused, as on a lost network, while
events keep being published. Every event is counted and its order checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page

from notify import embedded

from ..support import API_KEY, GatewayServer, TcpProxy, token

PAGE = Path(__file__).with_name("resume_page.html")
EACH_PHASE = 20


@pytest.fixture
async def proxy(gateway: GatewayServer) -> AsyncIterator[TcpProxy]:
    upstream = int(gateway.url.rsplit(":", 1)[1])
    proxy = TcpProxy(embedded.free_port(), upstream)
    await proxy.start()
    yield proxy
    await proxy.cut()


async def test_client_resumes_after_a_dropped_connection_without_missing_an_event(
    gateway: GatewayServer, proxy: TcpProxy, student: str, page: Page
) -> None:
    # The test page takes the gateway's origin by replacing a gateway page's content (a
    # page.route() would be neater, but with one in place this Chromium's WebSockets fail).
    await page.goto(f"http://127.0.0.1:{proxy.port}/healthz")
    await page.set_content(PAGE.read_text())
    await page.wait_for_function("() => typeof window.startClient === 'function'")
    await page.evaluate(
        "([url, token]) => startClient(url, token)",
        [f"ws://127.0.0.1:{proxy.port}/ws", token(student)],
    )
    await page.wait_for_function("() => window.probe.state === 'connected'")

    published: list[str] = []
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:

        async def publish(phase: int) -> None:
            for n in range(phase * EACH_PHASE, (phase + 1) * EACH_PHASE):
                body = {"user_id": student, "event": "LESSON_UPDATED", "data": {"n": n}}
                response = await http.post("/api/publish", json=body)
                assert response.status_code == 202, response.text
                published.extend(response.json()["ids"])

        # Connected; cut right after, so some of these are still in flight when it drops.
        await publish(0)
        await proxy.cut()
        await page.wait_for_function("() => window.probe.state !== 'connected'")
        # Disconnected, and every reconnect refused while these are published.
        await publish(1)
        assert await page.evaluate("window.probe.state") != "connected"
        await proxy.restore()
        # Published while the client reconnects and catches up.
        await publish(2)

    total = 3 * EACH_PHASE
    await page.wait_for_function(f"() => window.probe.received.length >= {total}")
    await page.wait_for_timeout(300)  # room for a duplicate to show up, if there were one
    probe: dict[str, Any] = await page.evaluate("window.probe")

    assert probe["received"] == published  # each once, in publish order
    # The position is written after each event is applied, and only then; first the
    # welcome's: the student's history before its first event ("<epoch>-0").
    first, *rest = probe["stored"]
    assert first == published[0].split("-")[0] + "-0"
    assert rest == published
    states = probe["states"]
    assert {"state": "waiting", "code": 1006} in _keys(states, "state", "code")
    assert states[-1] == {"state": "connected", "user": student, "recovered": True}


def _keys(states: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    return [{name: state.get(name) for name in names} for state in states]
