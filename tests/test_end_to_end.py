"""The first path, as deployed: Procfile processes, a real broker, a real WebSocket client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection

from notify import embedded, processes

from .support import (
    domain_event,
    events,
    nothing_arrives,
    open_client,
    produce,
    settings_env,
    token,
    unique,
)


@pytest.fixture
def stack(redis_url: str, kafka_bootstrap: str) -> Iterator[tuple[str, str]]:
    """``notify gateway`` and ``notify bridge`` as the Procfile runs them; yields (url, topic)."""
    topic = unique("purchase.events")
    port = embedded.free_port()
    env = {
        **os.environ,
        **settings_env(redis_url, PORT=str(port)),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "NOTIFY_KAFKA_TOPICS": topic,
        "NOTIFY_KAFKA_GROUP": unique("group"),
        "NOTIFY_DLQ_TOPIC": f"{topic}.dlq",
        "BRIDGE_PORT": str(embedded.free_port()),
    }
    asyncio.run(embedded.create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"]))
    children = [processes.spawn(processes.notify(name), env) for name in ("gateway", "bridge")]
    try:
        yield f"ws://127.0.0.1:{port}", topic
    finally:
        for child in children:
            processes.stop(child)
        # uvicorn re-raises SIGTERM once its graceful shutdown is done, as a shell expects.
        assert [child.returncode for child in children] in ([0, 0], [-signal.SIGTERM, 0])


async def connect_when_up(url: str) -> tuple[ClientConnection, dict[str, object]]:
    deadline = time.monotonic() + 20
    while True:
        try:
            return await open_client(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_purchase_created_reaches_only_its_student_within_one_second(
    stack: tuple[str, str], kafka_bootstrap: str
) -> None:
    url, topic = stack
    student, bystander = unique("student"), unique("student")
    ws, _ = await connect_when_up(f"{url}/ws?token={token(student)}")
    other, _ = await open_client(f"{url}/ws?token={token(bystander)}")

    # The bridge joins its consumer group in the background: wait for a first event so the
    # measurement below times delivery, not the join.
    await produce(kafka_bootstrap, topic, [domain_event("PURCHASE_CONFIRMED", studentId=student)])
    [warm_up] = await events(ws, 1, timeout=30)
    assert warm_up["event"] == "PAYMENT_CONFIRMED"

    purchase = domain_event("PURCHASE_CREATED", studentId=student, courseId="c1", purchaseId="p1")
    started = time.monotonic()
    await produce(kafka_bootstrap, topic, [purchase], key=student)
    [frame] = await events(ws, 1, timeout=1.0)
    elapsed = time.monotonic() - started
    assert frame["event"] == "COURSE_PURCHASED"
    assert frame["data"] == {"purchaseId": "p1", "courseId": "c1"}
    assert elapsed < 1.0
    await nothing_arrives(other, within=1.0)


async def test_send_event_cli_produces_the_documented_envelope(
    stack: tuple[str, str], kafka_bootstrap: str
) -> None:
    url, topic = stack
    student = unique("student")
    ws, _ = await connect_when_up(f"{url}/ws?token={token(student)}")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "NOTIFY_KAFKA_TOPICS": topic}
    result = subprocess.run(
        processes.notify("send-event", "PURCHASE_CREATED",
            "--student", student, "--course", "c9", "--field", "purchaseTier=30",
            "--field", "timeSlot=06:00"),
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent PURCHASE_CREATED ")
    [frame] = await events(ws, 1, timeout=30)
    assert frame["data"] == {"courseId": "c9", "purchaseTier": 30, "timeSlot": "06:00"}
