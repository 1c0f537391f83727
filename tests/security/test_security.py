"""Security: refused tokens, no cross-student frames, fuzzed inputs, secrets out of logs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge import envelope, rules
from gateway import schema
from notify import embedded, processes, protocol
from notify.publish import Notification

from ..chaos.harness import Figures
from ..chaos.report import record
from ..support import (
    API_KEY,
    JWT_SECRET,
    publisher,
    settings_env,
    wait_ready,
)
from . import fuzz

FUZZ_EXAMPLES = 10_000
AUDIENCE, ISSUER = "student-app", "learning-backend"


def fuzz_record(name: str, examples: int, unexpected: int) -> None:
    figures = Figures(produced=examples, delivered=examples - unexpected, lost=unexpected)
    record(name, figures, "inputs; lost = unexpected exceptions")


@pytest.fixture(scope="module")
def live(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A `notify gateway` process logging at DEBUG into a file the tests can read."""
    port = embedded.free_port()
    log_path = tmp_path_factory.mktemp("logs") / "gateway.log"
    env = {
        **os.environ,
        **settings_env(
            redis_url, PORT=str(port), NOTIFY_JWT_AUDIENCE=AUDIENCE, NOTIFY_JWT_ISSUER=ISSUER,
            NOTIFY_API_RATE_LIMIT="1000000",
        ),
        "NOTIFY_LOG_LEVEL": "DEBUG",
    }  # fmt: skip
    with log_path.open("wb") as log:
        command = processes.notify("gateway")
        process = processes.spawn(command, env, log=log)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url, log_path
        processes.stop(process)


def student_token(user: str | None, **claims: Any) -> str:
    body: dict[str, Any] = {"exp": int(time.time()) + 600, "aud": AUDIENCE, "iss": ISSUER}
    if user is not None:
        body["sub"] = user
    body.update(claims)
    return jwt.encode(body, claims.pop("key", JWT_SECRET), algorithm="HS256")


BAD_TOKENS = {
    "wrong signature": jwt.encode(
        {"sub": "s", "exp": int(time.time()) + 600, "aud": AUDIENCE, "iss": ISSUER},
        "another-secret-" + "y" * 32, algorithm="HS256",
    ),
    "alg none": jwt.encode(
        {"sub": "s", "exp": int(time.time()) + 600, "aud": AUDIENCE, "iss": ISSUER}, "",
        algorithm="none",
    ),
    "expired": student_token("s", exp=int(time.time()) - 5),
    "not yet valid": student_token("s", nbf=int(time.time()) + 600),
    "wrong audience": student_token("s", aud="someone-else"),
    "wrong issuer": student_token("s", iss="someone-else"),
    "no sub": student_token(None),
    # Over the gateway's 4 KiB token limit, under the HTTP parser's 8 KiB line limit.
    "huge": student_token("s", padding="x" * 5_000),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_tokens_are_refused_at_the_handshake(live: tuple[str, Path], case: str) -> None:
    url, _ = live
    ws_url = url.replace("http", "ws", 1) + "/ws"
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url, additional_headers={"Authorization": f"Bearer {BAD_TOKENS[case]}"})
    assert refused.value.response.status_code == 401


async def test_a_good_token_with_audience_and_issuer_is_accepted(live: tuple[str, Path]) -> None:
    url, _ = live
    ws = await connect(url.replace("http", "ws", 1) + f"/ws?token={student_token('s-ok')}")
    assert orjson.loads(await ws.recv())["user"] == "s-ok"
    await ws.close()


CATALOGUE = rules.load(None)
VALID_FRAMES: list[Any] = [{"type": "ping"}, {"type": "future", "x": 1}]
VALID_ENVELOPES: list[Any] = [
    {"eventId": "e1", "eventType": kind, "occurredAt": "2026-01-07T22:31:20Z",
     "data": {"studentId": "s1", "courseId": "c1", "purchaseId": "p1", "sessionCount": 3}}
    for kind in sorted(CATALOGUE)
]  # fmt: skip
VALID_BODIES: list[Any] = [
    {"user_id": "s1", "event": "E", "data": {"a": 1}, "invalidate": ["home"]},
    {"notifications": [{"user_id": "s1", "event": "E"}, {"user_id": "s2", "event": "F"}]},
    {"student_id": "s1", "course_id": "c1", "reason": "r", "invalidate": ["home"]},
]


def run_fuzz(name: str, samples: list[Any], check: Callable[[bytes], None]) -> None:
    """Feed FUZZ_EXAMPLES inputs to ``check``; anything it raises is an unexpected failure."""
    failures = []
    for index, raw in enumerate(fuzz.inputs(seed=len(name), samples=samples, count=FUZZ_EXAMPLES)):
        try:
            check(raw)
        except Exception as exc:
            failures.append((index, raw[:80], repr(exc)))
    fuzz_record(name, FUZZ_EXAMPLES, len(failures))
    assert not failures, failures[:5]


def test_fuzz_client_frame_handler() -> None:
    def check(raw: bytes) -> None:
        for frame in (raw, raw.decode(errors="replace")):
            try:
                parsed = protocol.parse_client_frame(frame)
            except protocol.ProtocolViolation as exc:
                if exc.code not in (
                    protocol.CloseCode.POLICY_VIOLATION,
                    protocol.CloseCode.TOO_BIG,
                ):
                    raise AssertionError(f"undocumented close code {exc.code}") from None
                continue
            if not isinstance(parsed, protocol.Ping | protocol.Ignored):
                raise AssertionError(parsed)

    run_fuzz("fuzz: WebSocket client frames", VALID_FRAMES, check)


def test_fuzz_kafka_envelope_parser() -> None:
    def check(raw: bytes) -> None:
        try:
            event = envelope.parse(raw)
            rule = CATALOGUE.get(event.event_type)
            if rule is not None:
                rules.apply(rule, event)
        except envelope.EnvelopeError as exc:
            if not str(exc):
                raise AssertionError("a dead letter needs a reason") from None

    run_fuzz("fuzz: Kafka envelopes", VALID_ENVELOPES, check)


def test_fuzz_http_api_validation() -> None:
    def check(raw: bytes) -> None:
        for validate in (schema.publish_request, schema.trigger_update_request):
            try:
                validate(schema.parse_json(raw))
            except schema.ApiError as exc:
                if not (400 <= exc.status < 500 and exc.message):
                    raise AssertionError(exc.body()) from None

    run_fuzz("fuzz: HTTP API bodies", VALID_BODIES, check)


async def test_live_fuzz_of_api_and_websocket_frames(live: tuple[str, Path]) -> None:
    """Fuzzed bodies and frames at the running process: only 2xx/4xx, documented closes,
    and no traceback in its log."""
    url, log_path = live
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        for body in fuzz.inputs(seed=7, samples=VALID_BODIES, count=300):
            for path in ("/api/publish", "/api/trigger-update"):
                response = await http.post(path, content=body)
                assert response.status_code < 500, (path, body, response.text)
    codes: set[int | None] = set()
    for frame in fuzz.inputs(seed=8, samples=VALID_FRAMES, count=200):
        ws = await connect(url.replace("http", "ws", 1) + f"/ws?token={student_token('fuzz')}")
        await ws.recv()  # welcome
        await ws.send(frame)  # a binary frame: the gateway must cope with those too
        await ws.send('{"type":"ping"}')
        try:
            while orjson.loads(await asyncio.wait_for(ws.recv(), 2)) != {"type": "pong"}:
                pass
            codes.add(None)
        except ConnectionClosed as closed:
            codes.add(closed.rcvd.code if closed.rcvd else -1)
        await ws.close()
    assert codes <= {None, 1008, 1009}
    await asyncio.sleep(0.5)
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text
    assert "Exception in ASGI application" not in text
    fuzz_record("fuzz: live API bodies and WS frames", 800, 0)


async def test_tokens_and_api_keys_never_reach_the_logs(live: tuple[str, Path]) -> None:
    url, log_path = live
    secret = student_token("log-check")
    ws = await connect(url.replace("http", "ws", 1) + f"/ws?token={secret}")
    await ws.recv()
    await ws.close()
    ws = await connect(
        url.replace("http", "ws", 1) + "/ws",
        additional_headers={"Authorization": f"Bearer {secret}"},
    )
    await ws.recv()
    await ws.close()
    with pytest.raises(InvalidStatus):
        await connect(url.replace("http", "ws", 1) + f"/ws?token={secret}tampered")
    async with httpx.AsyncClient(base_url=url) as http:
        await http.get("/api/audit", headers={"Authorization": f"Bearer {API_KEY}"})
        await http.get("/api/audit", headers={"Authorization": "Bearer wrong-key-0123456789xyz"})
    await asyncio.sleep(0.5)
    text = log_path.read_text(errors="replace")
    assert "token=[redacted]" in text  # the handshake lines are there, redacted
    for needle in (secret, secret.split(".")[2], API_KEY, "wrong-key-0123456789xyz", JWT_SECRET):
        assert needle not in text


# Isolation: random interleavings of students, devices and events.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("connect"), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("disconnect"), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("publish"), st.integers(0, 3), st.integers(0, 2)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=operations)
def test_no_frame_ever_reaches_another_students_connection(
    live: tuple[str, Path], redis_url: str, ops: list[tuple[str, int, int]]
) -> None:
    asyncio.run(_interleave(live[0], redis_url, ops))


async def _interleave(url: str, redis_url: str, ops: list[tuple[str, int, int]]) -> None:
    run = os.urandom(4).hex()
    students = [f"iso-{run}-{i}" for i in range(4)]
    redis = Redis.from_url(redis_url)
    pub = publisher(redis)
    sockets: dict[tuple[int, int], Any] = {}
    received: dict[tuple[int, int], list[dict[str, Any]]] = {}
    readers: list[asyncio.Task[None]] = []

    async def read(key: tuple[int, int], ws: Any) -> None:
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame["type"] == "event":
                received[key].append(frame)

    try:
        for op, s, d in ops:
            key = (s, d)
            if op == "connect" and key not in sockets:
                ws = await connect(
                    url.replace("http", "ws", 1) + f"/ws?token={student_token(students[s])}"
                )
                await ws.recv()
                sockets[key] = ws
                received.setdefault(key, [])
                readers.append(asyncio.create_task(read(key, ws)))
            elif op == "disconnect" and key in sockets:
                await sockets.pop(key).close()
            elif op == "publish":
                await pub.publish(Notification(students[s], "ISO", {"for": students[s]}))
        await asyncio.sleep(0.2)
    finally:
        for ws in sockets.values():
            await ws.close()
        for task in readers:
            task.cancel()
        await redis.aclose()
    for (s, _d), frames in received.items():
        for frame in frames:
            assert frame["data"]["for"] == students[s]
        ids = [f["id"] for f in frames]
        assert len(ids) == len(set(ids))


async def test_logs_are_json_lines(live: tuple[str, Path]) -> None:
    url, log_path = live
    ws = await connect(url.replace("http", "ws", 1) + f"/ws?token={student_token('json-log')}")
    await ws.recv()
    await ws.close()
    await asyncio.sleep(0.3)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = orjson.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), line
    assert any("WebSocket /ws?token=[redacted]" in orjson.loads(x)["message"] for x in lines)
