"""The HTTP API against the real app and Redis: success and error paths of every endpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from notify import embedded, processes

from .support import (
    API_KEY,
    PUBLISHER_KEY,
    GatewayServer,
    events,
    nothing_arrives,
    open_client,
    start_gateway,
)
from .test_bridge import run_bridge

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def http(gateway: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, headers=AUTH) as client:
        yield client


async def test_publish_reaches_the_student_and_its_history(
    gateway: GatewayServer, http: httpx.AsyncClient, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    response = await http.post(
        "/api/publish",
        json={"user_id": student, "event": "COURSE_PURCHASED", "data": {"courseId": "c1"},
              "invalidate": ["home"]},
    )  # fmt: skip
    assert response.status_code == 202
    [event_id] = response.json()["ids"]
    [frame] = await events(ws, 1)
    assert frame["id"] == event_id
    assert (frame["event"], frame["data"], frame["invalidate"]) == (
        "COURSE_PURCHASED",
        {"courseId": "c1"},
        ["home"],
    )
    history = (await http.get(f"/api/history/{student}")).json()
    assert history["user_id"] == student
    assert [e["id"] for e in history["events"]] == [event_id]
    await ws.close()


async def test_batch_is_published_whole(
    gateway: GatewayServer, http: httpx.AsyncClient, student: str
) -> None:
    other = student + "-2"
    ws, _ = await open_client(gateway.ws_url(student))
    batch = [
        {"user_id": student, "event": "A"},
        {"user_id": other, "event": "B"},
        {"user_id": student, "event": "C", "data": {"n": 3}},
    ]
    response = await http.post("/api/publish", json={"notifications": batch})
    assert response.status_code == 202
    assert len(response.json()["ids"]) == 3
    assert [f["event"] for f in await events(ws, 2)] == ["A", "C"]
    await ws.close()


async def test_a_batch_with_one_bad_item_publishes_nothing(
    gateway: GatewayServer, http: httpx.AsyncClient, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    batch = [{"user_id": student, "event": "GOOD"}, {"user_id": student, "event": "bad name"}]
    response = await http.post("/api/publish", json={"notifications": batch})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "notifications[1].event"
    await nothing_arrives(ws)
    assert (await http.get(f"/api/history/{student}")).json()["events"] == []
    await ws.close()


async def test_idempotency_key_publishes_once(
    gateway: GatewayServer, http: httpx.AsyncClient, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    body = {"user_id": student, "event": "PAYMENT_CONFIRMED", "idempotency_key": "pay-1"}
    first = (await http.post("/api/publish", json=body)).json()["ids"]
    again = (await http.post("/api/publish", json=body)).json()["ids"]
    assert first == again
    assert len(await events(ws, 1)) == 1
    await nothing_arrives(ws)
    await ws.close()


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "field"),
    [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "malformed_json", None),
        ({"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type", None),
        ({"json": {"user_id": "u", "event": "E", "data": {"x": "y" * 300_000}}}, 413,
         "too_large", None),
        ({"json": {"user_id": "u", "event": "E", "data": {"x": "y" * 70_000}}}, 413,
         "too_large", "data"),
        ({"json": {"userId": "u", "event": "E"}}, 422, "unknown_field", "userId"),
        ({"json": {"user_id": "u"}}, 422, "missing", "event"),
        ({"json": {"user_id": "u", "event": "lower"}}, 422, "invalid", "event"),
        ({"json": {"user_id": "a b", "event": "E"}}, 422, "invalid", "user_id"),
        ({"json": {"user_id": "u", "event": "E", "invalidate": "home"}}, 422, "invalid",
         "invalidate"),
        ({"json": {"notifications": []}}, 422, "invalid", "notifications"),
        ({"json": [1, 2]}, 422, "invalid", None),
    ],
)  # fmt: skip
async def test_publish_errors_name_the_field(
    http: httpx.AsyncClient, kwargs: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    response = await http.post("/api/publish", **kwargs)
    assert response.status_code == status
    assert response.json() == {"error": {"code": code, "message": response.json()["error"][
        "message"], "field": field}}  # fmt: skip


async def test_api_keys_are_required(gateway: GatewayServer, student: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for headers in ({}, {"Authorization": "Bearer not-the-key-0123456789"}):
            for method, path in (("GET", f"/api/history/{student}"), ("POST", "/api/publish")):
                response = await http.request(method, path, headers=headers, json={})
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "unauthorized"


async def test_rate_limit_per_key(redis_url: str) -> None:
    # The windows are counted in each gateway process's memory: this one starts empty.
    keys_env = f"publisher:operator={API_KEY}"
    async with (
        start_gateway(redis_url, NOTIFY_API_RATE_LIMIT="5", NOTIFY_API_KEYS=keys_env) as gateway,
        httpx.AsyncClient(base_url=gateway.url, headers=AUTH) as http,
    ):
        statuses = [(await http.get("/api/audit?limit=1")).status_code for _ in range(12)]
    assert statuses[0] == 200
    assert 429 in statuses
    assert set(statuses) == {200, 429}


async def test_guessing_keys_hits_the_rate_limit(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        statuses = [
            (
                await http.get("/api/audit", headers={"Authorization": f"Bearer guess-{n:016d}"})
            ).status_code
            for n in range(30)
        ]
    assert 429 in statuses
    assert set(statuses) <= {401, 429}


async def test_trigger_update_clears_the_cache_pushes_and_is_audited(
    gateway: GatewayServer, http: httpx.AsyncClient, redis: Redis, student: str
) -> None:
    cache_keys = [f"student:home:{student}", f"student:learning:{student}"]
    await redis.mset({cache_keys[0]: "stale", cache_keys[1]: "stale"})
    ws, _ = await open_client(gateway.ws_url(student))
    response = await http.post(
        "/api/trigger-update",
        json={"student_id": student, "course_id": "c1", "reason": "manual purchase fix"},
    )
    assert response.status_code == 200
    result = response.json()
    assert result["cache_keys_deleted"] == cache_keys
    assert result["connections"] == 1
    assert await redis.exists(*cache_keys) == 0
    [frame] = await events(ws, 1)
    assert frame["id"] == result["id"]
    assert frame["event"] == "STORE_INVALIDATE"
    assert frame["data"] == {"courseId": "c1", "reason": "manual purchase fix"}
    assert frame["invalidate"] == ["home", "learning"]
    [entry] = (await http.get("/api/audit?limit=1")).json()["entries"]
    assert entry["caller"] == "tests"
    assert entry["student_id"] == student
    assert entry["reason"] == "manual purchase fix"
    assert entry["result"] == result
    assert "time" in entry
    await ws.close()


async def test_refused_calls_are_counted_not_audited(
    gateway: GatewayServer, http: httpx.AsyncClient
) -> None:
    """Review item 3: refused calls written to the bounded audit stream could push the
    real entries out of it, at the rate limit, in minutes."""
    before = (await http.get("/api/audit?limit=1")).json()["entries"]
    response = await http.post("/api/trigger-update", json={"student_id": "x", "reasons": "?"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "reasons"
    assert (await http.get("/api/audit?limit=1")).json()["entries"] == before
    metrics = (await http.get("/metrics")).text
    assert 'notify_gateway_api_refused_total{action="trigger-update",status="422"}' in metrics


async def test_a_publisher_key_publishes_and_nothing_else(
    gateway: GatewayServer, student: str
) -> None:
    """Review item 3: any key could mint a student token or read any student's history."""
    headers = {"Authorization": f"Bearer {PUBLISHER_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers) as http:
        published = await http.post(
            "/api/publish", json={"notifications": [{"user_id": student, "event": "E"}]}
        )
        assert published.status_code == 202
        for method, path in (
            ("POST", f"/api/students/{student}/watch-token"),
            ("POST", "/api/trigger-update"),
            ("GET", f"/api/history/{student}"),
            ("GET", f"/api/presence/{student}"),
            ("GET", "/api/audit"),
        ):
            response = await http.request(method, path, json={"student_id": student})
            assert response.status_code == 403, path
            error = response.json()["error"]
            assert error["code"] == "forbidden"
            assert "operator" in error["message"]


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=5000", "limit=%C2%B2"])
async def test_limits_are_validated(http: httpx.AsyncClient, query: str) -> None:
    response = await http.get(f"/api/audit?{query}")
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "limit"


async def test_publish_reaches_the_student_while_kafka_is_stopped(
    gateway: GatewayServer, http: httpx.AsyncClient, redis_url: str, student: str
) -> None:
    kafka = embedded.start_kafka()
    try:
        async with run_bridge(redis_url, kafka.address):
            ws, _ = await open_client(gateway.ws_url(student))
            kafka.process.send_signal(signal.SIGSTOP)
            response = await http.post(
                "/api/publish", json={"user_id": student, "event": "COURSE_PURCHASED"}
            )
            assert response.status_code == 202
            [frame] = await events(ws, 1)
            assert frame["event"] == "COURSE_PURCHASED"
            kafka.process.send_signal(signal.SIGCONT)
            await ws.close()
    finally:
        kafka.process.send_signal(signal.SIGCONT)
        kafka.stop()


def cli(url: str, *args: str, key: str = API_KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTIFY_URL": url, "NOTIFY_API_KEY": key}
    return subprocess.run(
        processes.notify(*args),
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


async def test_operator_cli(gateway: GatewayServer, redis: Redis, student: str) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    await redis.set(f"student:home:{student}", "stale")
    run = asyncio.to_thread
    result = await run(cli, gateway.url, "trigger-update", student, "--reason", "support ticket")
    assert result.returncode == 0, result.stderr
    assert f"cache keys deleted: student:home:{student}" in result.stdout
    assert "connected devices: 1" in result.stdout
    result = await run(
        cli, gateway.url, "publish", student, "SESSIONS_GENERATED", "--data",
        '{"sessionCount": 30}', "--invalidate", "learning",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frames = await events(ws, 2)
    assert [f["event"] for f in frames] == ["STORE_INVALIDATE", "SESSIONS_GENERATED"]
    result = await run(cli, gateway.url, "presence", student)
    assert result.stdout.strip() == f"{student}: 1 connection(s)"
    result = await run(cli, gateway.url, "history", student)
    assert "SESSIONS_GENERATED" in result.stdout
    assert '{"sessionCount":30}' in result.stdout
    result = await run(cli, gateway.url, "publish", student, "bad", key="wrong-key-0123456789")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "notify: error: HTTP 401 unauthorized: a valid API key is required"
    )
    result = await run(cli, gateway.url, "publish", student, "bad name")
    assert result.returncode == 1
    assert "(field event)" in result.stderr
    await ws.close()


async def test_data_nested_too_deeply_is_a_422(http: httpx.AsyncClient, student: str) -> None:
    # Valid JSON that orjson reads (depth 300) but cannot write back: a 422, not a 500.
    nested = b"[" * 300 + b"1" + b"]" * 300
    body = b'{"user_id":"%s","event":"E","data":{"x":%s}}' % (student.encode(), nested)
    response = await http.post(
        "/api/publish", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "data"


async def test_watch_token_opens_the_students_stream_and_is_audited(
    gateway: GatewayServer, http: httpx.AsyncClient, student: str
) -> None:
    response = await http.post(f"/api/students/{student}/watch-token")
    assert response.status_code == 200
    body = response.json()
    assert (body["user_id"], body["expires_in"]) == (student, 600)
    ws, welcome = await open_client(f"{gateway.ws_url()}?token={body['token']}")
    assert welcome["user"] == student
    # The operator watching is not one of the student's devices.
    presence = await http.get(f"/api/presence/{student}")
    assert presence.json()["connections"] == 0
    [entry] = (await http.get("/api/audit?limit=1")).json()["entries"]
    assert (entry["caller"], entry["action"], entry["student_id"]) == (
        "tests",
        "watch-token",
        student,
    )
    assert body["token"] not in str(entry)
    await ws.close()


async def test_watch_token_refused_where_the_gateway_cannot_sign(
    redis_url: str, student: str
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    async with (
        start_gateway(redis_url, NOTIFY_JWT_SECRET="", NOTIFY_JWT_PUBLIC_KEY=pem) as gateway,
        httpx.AsyncClient(base_url=gateway.url, headers=AUTH) as http,
    ):
        response = await http.post(f"/api/students/{student}/watch-token")
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "cannot_sign"
        assert "NOTIFY_JWT_SECRET" in error["message"]
