"""The gateway against a real Redis and real WebSocket clients."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from notify.publish import Notification, Published

from .support import (
    GatewayServer,
    events,
    nothing_arrives,
    open_client,
    publisher,
    recv_json,
    token,
)


async def test_event_reaches_every_device_of_the_student_and_no_one_else(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    phone, welcome = await open_client(gateway.ws_url(student))
    tablet, _ = await open_client(gateway.ws_url(student))
    other, _ = await open_client(gateway.ws_url(student + "-other"))
    # A student without events has a position too: before the first event of its history.
    assert welcome == {
        "type": "welcome",
        "user": student,
        "last_id": welcome["last_id"],
        "recovered": False,
    }
    assert welcome["last_id"].endswith("-0")

    published = await publisher(redis).publish(
        Notification(student, "COURSE_PURCHASED", {"courseId": "c1"}, ("home", "learning"))
    )

    for ws in (phone, tablet):
        [frame] = await events(ws, 1)
        assert frame["type"] == "event"
        assert frame["id"] == str(published.id)
        assert frame["event"] == "COURSE_PURCHASED"
        assert frame["data"] == {"courseId": "c1"}
        assert frame["invalidate"] == ["home", "learning"]
        assert isinstance(frame["ts"], int)
    await nothing_arrives(other)
    for ws in (phone, tablet, other):
        await ws.close()


async def test_events_arrive_in_publish_order_with_increasing_ids(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    pub = publisher(redis)
    ids = [(await pub.publish(Notification(student, "E", {"n": n}))).id for n in range(50)]
    frames = await events(ws, 50)
    assert [f["data"]["n"] for f in frames] == list(range(50))
    assert [f["id"] for f in frames] == [str(i) for i in ids]
    assert [i.seq for i in ids] == list(range(1, 51))
    await ws.close()


async def test_duplicate_dedupe_key_delivers_once(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    pub = publisher(redis)
    first = await pub.publish(Notification(student, "E", dedupe_key="ev:1"))
    again = await pub.publish(Notification(student, "E", dedupe_key="ev:1"))
    assert again.duplicate
    assert again.id == first.id
    [frame] = await events(ws, 1)
    assert frame["id"] == str(first.id)
    await nothing_arrives(ws)
    await ws.close()


async def test_one_call_sees_the_dedupe_keys_it_wrote(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """The publish function reads every dedupe key of a call in one go, before it publishes
    anything: a key met twice in one call must still be a duplicate the second time."""
    ws, _ = await open_client(gateway.ws_url(student))
    sent = await publisher(redis).invalidate_then_publish(
        (),
        [
            Notification(student, "E", {"n": 1}, dedupe_key="ev:1"),
            Notification(student, "E", {"n": 2}, dedupe_key="ev:1"),
            Notification(student, "E", {"n": 3}, dedupe_key="ev:2"),
        ],
    )
    results = [r for r in sent.results if isinstance(r, Published)]
    assert [r.duplicate for r in results] == [False, True, False]
    assert results[1].id == results[0].id
    frames = await events(ws, 2)
    assert [f["data"]["n"] for f in frames] == [1, 3]
    await nothing_arrives(ws)
    await ws.close()


@pytest.mark.parametrize(
    "query",
    ["", "?token=not-a-jwt", f"?token={token('someone', ttl=-10)}"],
    ids=["missing", "malformed", "expired"],
)
async def test_bad_token_is_refused_with_401_before_upgrade(
    gateway: GatewayServer, query: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(gateway.ws_url() + query)
    assert refused.value.response.status_code == 401
    assert b"unauthorized" in refused.value.response.body


async def test_token_in_authorization_header(gateway: GatewayServer, student: str) -> None:
    ws = await connect(
        gateway.ws_url(), additional_headers={"Authorization": f"Bearer {token(student)}"}
    )
    welcome = await recv_json(ws)
    assert welcome["user"] == student
    await ws.close()


async def test_two_authorization_headers_are_refused_with_401(
    gateway: GatewayServer, student: str
) -> None:
    bearer = f"Bearer {token(student)}"
    with pytest.raises(InvalidStatus) as refused:
        await connect(gateway.ws_url(), additional_headers=[("Authorization", bearer)] * 2)
    assert refused.value.response.status_code == 401
    # Refused before the upgrade, so nothing lingers for shutdown to wait on.
    assert not gateway.gateway.sessions


async def test_application_ping_is_answered(gateway: GatewayServer, student: str) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    await ws.send('{"type":"ping"}')
    await ws.send('{"type":"something-newer"}')
    await ws.send(['{"type":', '"ping"}'])  # one message in two frames
    assert await events(ws, 2) == [{"type": "pong"}, {"type": "pong"}]
    await ws.close()


@pytest.mark.parametrize(
    ("frame", "code"), [("not json", 1008), ("[1,2]", 1008), ("x" * 5000, 1009)]
)
async def test_bad_client_frames_close_with_documented_codes(
    gateway: GatewayServer, student: str, frame: str, code: int
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    await ws.send(frame)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == code


async def test_healthz_and_readyz(gateway: GatewayServer) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True}


async def test_tokens_never_reach_the_logs(
    gateway: GatewayServer, student: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = token(student)
    ws = await connect(gateway.ws_url() + f"?token={secret}")
    await recv_json(ws)
    await ws.close()
    with pytest.raises(InvalidStatus):
        await connect(gateway.ws_url() + f"?token={secret}x")
    ws = await connect(gateway.ws_url(), additional_headers={"Authorization": f"Bearer {secret}"})
    await recv_json(ws)
    await ws.close()
    # Other spellings the gateway accepts (review item 10): a percent-encoded parameter
    # name, and the scheme in capitals (websockets logs request headers at DEBUG).
    ws = await connect(gateway.ws_url() + f"?%74oken={secret}")
    await recv_json(ws)
    await ws.close()
    ws = await connect(gateway.ws_url(), additional_headers={"Authorization": f"BEARER {secret}"})
    await recv_json(ws)
    await ws.close()
    await asyncio.sleep(0.1)
    # The test's own client logs its request line; only the server's records matter here.
    server = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(("uvicorn", "gateway", "bridge", "notify"))
    )
    assert "/ws?token=[redacted]" in server
    assert secret.split(".")[2] not in server


async def test_metrics_count_what_happened(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    import httpx

    pub = publisher(redis)
    ws, _ = await open_client(gateway.ws_url(student))
    first = await pub.publish(Notification(student, "E", {"n": 1}))
    await pub.publish(Notification(student, "E", {"n": 2}))
    await events(ws, 2)
    resumed, welcome = await open_client(gateway.ws_url(student, since=str(first.id)))
    assert welcome["recovered"] is True
    await events(resumed, 1)
    stale, _ = await open_client(gateway.ws_url(student, since="garbage"))
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        text = (await http.get("/metrics")).text
    expected = [
        'notify_gateway_notifications_pushed_total{source="live"} 2.0',
        'notify_gateway_notifications_pushed_total{source="replay"} 1.0',
        'notify_gateway_resumes_total{outcome="recovered"} 1.0',
        'notify_gateway_resumes_total{outcome="resync"} 1.0',
        "notify_gateway_connections 3.0",
        "notify_gateway_publish_to_write_seconds_count 2.0",
    ]
    for line in expected:
        assert line in text, line
    for client in (ws, resumed, stale):
        await client.close()
