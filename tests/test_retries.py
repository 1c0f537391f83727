"""A publish whose reply is lost with its connection has run; its retry must not run again.

redis-py re-sends a command (a whole pipeline, MULTI included) when the connection drops
before the reply arrives. A TCP proxy between the publisher and Redis drops exactly that
reply here, for every producer that goes through the publish contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from notify import embedded, redis_client
from notify.publish import Notification

from .support import API_KEY, KEYS, TcpProxy, publisher, start_gateway


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    upstream = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(embedded.free_port(), upstream)
    await proxy.start()
    yield proxy
    await proxy.cut()


def through(proxy: TcpProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}/0"


async def test_a_publish_without_a_dedupe_key_is_not_repeated_by_a_retry(
    proxy: TcpProxy, redis: Redis, student: str
) -> None:
    client = redis_client.client(through(proxy))
    pub = publisher(client)
    try:
        await pub.publish(Notification(student, "E", {"n": 0}))  # the library is loaded
        proxy.drop_reply_to = b"FCALL"
        published = await pub.publish(Notification(student, "E", {"n": 1}))
        assert proxy.drop_reply_to is None, "the reply was not dropped"
        # The resent call answered what the first run answered: the same id.
        assert published.id.seq == 2
        assert await redis.llen(KEYS.history(student)) == 2
    finally:
        await client.aclose()


async def test_a_trigger_update_whose_reply_is_lost_pushes_once(
    proxy: TcpProxy, redis: Redis, student: str
) -> None:
    async with (
        start_gateway(through(proxy)) as gateway,
        httpx.AsyncClient(
            base_url=gateway.url, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as http,
    ):
        # A first push loads the library on the gateway's Redis.
        first = await http.post("/api/trigger-update", json={"student_id": student})
        assert first.status_code == 200
        proxy.drop_reply_to = b"FCALL"
        response = await http.post("/api/trigger-update", json={"student_id": student})
        assert response.status_code == 200, response.text
        assert proxy.drop_reply_to is None, "the reply was not dropped"
        assert response.json()["id"].endswith("-2")
    assert await redis.llen(KEYS.history(student)) == 2
