"""The PostgreSQL outbox against a real PostgreSQL, Redis, Kafka-protocol broker and gateway.

Each test has a table of its own; rows are inserted the way a backend does it, in its own
transaction, with the SQL docs/outbox.md gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from bridge import rules
from bridge.outbox import forward
from bridge.outbox.forward import Forwarder
from bridge.outbox.relay import Relay
from bridge.outbox.store import Outbox
from notify import config, embedded, processes

from .support import (
    KEYS,
    GatewayServer,
    TcpProxy,
    domain_event,
    events,
    nothing_arrives,
    open_client,
    unique,
)
from .test_bridge import read_topic, run_bridge

INSERT = """
INSERT INTO {table} (event_id, event_type, key, payload, topic) VALUES ($1, $2, $3, $4, $5)
"""


@dataclass
class Backend:
    """The payment service's side: its database connection and the outbox table."""

    conn: Any
    table: str
    topic: str

    async def emit(self, event: dict[str, Any], topic: str | None = "default") -> None:
        """One domain event, in a transaction of its own (as with the business change)."""
        async with self.conn.transaction():
            await self.insert(event, topic)

    async def insert(self, event: dict[str, Any], topic: str | None = "default") -> None:
        await self.conn.execute(
            INSERT.format(table=self.table),
            event["eventId"],
            event["eventType"],
            event["data"]["studentId"],
            orjson.dumps(event).decode(),
            self.topic if topic == "default" else topic,
        )

    async def count(self, where: str = "true") -> int:
        return int(await self.conn.fetchval(f"SELECT count(*) FROM {self.table} WHERE {where}"))

    async def holds(self, rows: int, where: str = "true") -> bool:
        return await self.count(where) == rows


@pytest.fixture
async def backend(postgres_dsn: str, kafka_bootstrap: str) -> AsyncIterator[Backend]:
    table = unique("outbox").replace("-", "_")
    topic = unique("purchase.events")
    await embedded.create_topics(kafka_bootstrap, [topic])
    conn = await asyncpg.connect(postgres_dsn)
    await Outbox(table).create(conn)
    try:
        yield Backend(conn, table, topic)
    finally:
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()


def relay_for(postgres_dsn: str, table: str, redis_url: str, bootstrap: str, **extra: str) -> Relay:
    settings = config.load_outbox(
        {
            "NOTIFY_OUTBOX_DSN": postgres_dsn,
            "NOTIFY_OUTBOX_TABLE": table,
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            # tansu has no InitProducerId: no idempotent producer against it.
            "NOTIFY_OUTBOX_IDEMPOTENT": "0",
            **extra,
        }
    )
    return Relay(settings, rules.load(None))


@contextlib.asynccontextmanager
async def run_relay(
    postgres_dsn: str, table: str, redis_url: str, bootstrap: str, **extra: str
) -> AsyncIterator[Relay]:
    relay = relay_for(postgres_dsn, table, redis_url, bootstrap, **extra)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def purchase(student: str, **data: Any) -> dict[str, Any]:
    return domain_event("PURCHASE_CREATED", studentId=student, courseId="c1", **data)


async def test_a_committed_row_notifies_its_student_and_reaches_kafka(
    gateway: GatewayServer,
    backend: Backend,
    postgres_dsn: str,
    redis: Redis,
    redis_url: str,
    kafka_bootstrap: str,
    student: str,
) -> None:
    await redis.set(f"student:home:{student}", "stale")
    ws, _ = await open_client(gateway.ws_url(student))
    event = purchase(student, purchaseId="p1", purchaseTier=30)
    async with run_relay(postgres_dsn, backend.table, redis_url, kafka_bootstrap):
        await backend.emit(event)
        [frame] = await events(ws, 1, timeout=10)
        assert frame["event"] == "COURSE_PURCHASED"
        assert frame["data"]["purchaseId"] == "p1"
        assert await redis.exists(f"student:home:{student}") == 0
        [message] = await read_topic(kafka_bootstrap, backend.topic, 1)
        # Done on both sides, the row is gone.
        await eventually(lambda: backend.holds(0))
    assert message.key == student.encode()
    assert orjson.loads(message.value) == event
    assert dict(message.headers)["notify-event-id"] == event["eventId"].encode()
    await nothing_arrives(ws)
    await ws.close()


async def test_a_rolled_back_row_notifies_no_one(
    gateway: GatewayServer,
    backend: Backend,
    postgres_dsn: str,
    redis_url: str,
    kafka_bootstrap: str,
    student: str,
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    async with run_relay(postgres_dsn, backend.table, redis_url, kafka_bootstrap):
        with contextlib.suppress(RuntimeError):
            async with backend.conn.transaction():
                await backend.insert(purchase(student, purchaseId="rolled-back"))
                raise RuntimeError("the payment failed: the business change is undone")
        await backend.emit(purchase(student, purchaseId="committed"))
        [frame] = await events(ws, 1, timeout=10)
        await nothing_arrives(ws, within=1.0)
    assert frame["data"]["purchaseId"] == "committed"
    await ws.close()


async def test_while_kafka_is_down_students_are_notified_and_kafka_catches_up_later(
    gateway: GatewayServer,
    backend: Backend,
    redis: Redis,
    postgres_dsn: str,
    redis_url: str,
    kafka_bootstrap: str,
    student: str,
) -> None:
    """The first incident: Kafka refused connections; the event must not be lost, and the
    student must hear of it at once."""
    proxy = TcpProxy(embedded.free_port(), int(kafka_bootstrap.rsplit(":", 1)[1]))
    ws, _ = await open_client(gateway.ws_url(student))
    sent = [purchase(student, purchaseId=f"p{n}") for n in range(5)]
    async with run_relay(postgres_dsn, backend.table, redis_url, f"127.0.0.1:{proxy.port}"):
        # The proxy is not listening: Kafka is down from the relay's point of view.
        for event in sent:
            await backend.emit(event)
        frames = await events(ws, 5, timeout=10)
        assert [f["data"]["purchaseId"] for f in frames] == [f"p{n}" for n in range(5)]
        assert await backend.count("forwarded_at IS NULL") == 5
        # Recorded as notified (the frames can arrive before the relay's commit).
        await eventually(lambda: backend.holds(0, "notified_at IS NULL"), within=10)
        await proxy.start()
        await eventually(lambda: backend.holds(0), within=60)
    await proxy.cut()
    messages = await read_topic(kafka_bootstrap, backend.topic, 5)
    assert [orjson.loads(m.value)["data"]["purchaseId"] for m in messages] == [
        f"p{n}" for n in range(5)
    ]
    # They were notified before they were forwarded: the bridge notifies nothing again,
    # even once the dedupe keys are gone (Kafka down for longer than NOTIFY_DEDUPE_TTL).
    assert all(dict(m.headers).get("notify-notified") == b"1" for m in messages)
    async for key in redis.scan_iter(match=KEYS.dedupe(student, "*")):
        await redis.delete(key)
    async with run_bridge(redis_url, kafka_bootstrap, topic=backend.topic, create=False) as bridge:
        consumed = bridge.bridge.metrics.consumed.labels(bridge.topic)
        await eventually(lambda: _reached(consumed, 5))
        await nothing_arrives(ws, within=1.0)
    await ws.close()


async def test_a_kafka_request_given_up_does_not_reorder_a_students_events(
    backend: Backend,
    postgres_dsn: str,
    redis_url: str,
    student: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker stops answering while the relay sends one student's rows. The producer
    gives the request up after its timeout; whatever else of that partition it had queued
    must not land before the rows of the request given up, or the retry puts the student's
    earlier events after later ones."""
    # The rows of one call make many record batches (the producer's own are as small).
    monkeypatch.setattr(forward, "BATCH_BYTES", 16 * 1024)
    proxy_port = embedded.free_port()
    kafka = embedded.start_kafka(advertised_port=proxy_port)
    proxy = TcpProxy(proxy_port, kafka.port)
    await proxy.start()
    try:
        await embedded.create_topics(kafka.address, [backend.topic])
        async with run_relay(postgres_dsn, backend.table, redis_url, kafka.address):
            await backend.emit(purchase(student, purchaseId="warm-up"))
            await eventually(lambda: backend.holds(0))  # the producer is connected
            proxy.stall()
            async with backend.conn.transaction():
                for n in range(300):  # about 220 KB
                    await backend.insert(purchase(student, purchaseId=f"p{n}", note="x" * 500))
            await eventually(lambda: backend.holds(0), within=90)
        messages = await read_topic(kafka.address, backend.topic, 100_000, timeout=5)
    finally:
        await proxy.cut()
        kafka.stop()
    assert "outbox forward stage failing" in caplog.text  # a request was given up
    first_seen = list(dict.fromkeys(orjson.loads(m.value)["data"]["purchaseId"] for m in messages))
    assert first_seen == ["warm-up", *(f"p{n}" for n in range(300))]


async def test_a_row_too_large_for_kafka_is_failed_and_the_rest_go_on(
    backend: Backend, postgres_dsn: str, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    async with run_relay(postgres_dsn, backend.table, redis_url, kafka_bootstrap):
        async with backend.conn.transaction():
            await backend.insert(purchase(student, purchaseId="p0"))
            await backend.insert(purchase(student, purchaseId="huge", note="x" * 1_100_000))
            await backend.insert(purchase(student, purchaseId="p1"))
        await eventually(lambda: backend.holds(1), within=30)
    [failure] = await backend.conn.fetch(
        f"SELECT payload->'data'->>'purchaseId' AS id, failure FROM {backend.table}"
    )
    assert failure["id"] == "huge"
    assert "too large for Kafka" in failure["failure"]
    messages = await read_topic(kafka_bootstrap, backend.topic, 2)
    assert [orjson.loads(m.value)["data"]["purchaseId"] for m in messages] == ["p0", "p1"]


async def test_both_forward_batches_starting_at_once_share_one_producer(
    backend: Backend, postgres_dsn: str, redis_url: str, kafka_bootstrap: str
) -> None:
    """The forward stage runs two batches at once, and both need the producer first: a
    second one started beside it would never be stopped (a connection and a task leaked)."""
    forwarder = Forwarder(kafka_bootstrap, idempotent=False)
    try:
        first, second = await asyncio.gather(forwarder.connect(), forwarder.connect())
        assert first is second
    finally:
        await forwarder.close()


async def _reached(counter: Any, count: int) -> bool:
    return bool(counter._value.get() >= count)


async def test_while_redis_is_down_forwarding_goes_on(
    private_redis: embedded.Server,
    backend: Backend,
    postgres_dsn: str,
    kafka_bootstrap: str,
    student: str,
) -> None:
    event = purchase(student, purchaseId="p1")
    port = private_redis.port
    private_redis.stop()
    async with run_relay(
        postgres_dsn, backend.table, f"redis://127.0.0.1:{port}/0", kafka_bootstrap
    ):
        await backend.emit(event)
        [message] = await read_topic(kafka_bootstrap, backend.topic, 1)
        assert await backend.count("notified_at IS NULL") == 1
        # Not notified yet: the bridge would notify it (the header says so).
        assert "notify-notified" not in dict(message.headers)
        restarted = embedded.start_redis(port)
        try:
            await eventually(lambda: backend.holds(0), within=30)
        finally:
            restarted.stop()


async def test_a_row_that_cannot_be_mapped_is_failed_and_blocks_no_one(
    gateway: GatewayServer,
    backend: Backend,
    postgres_dsn: str,
    redis_url: str,
    kafka_bootstrap: str,
    student: str,
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    broken = domain_event("PURCHASE_CREATED", courseId="c1")  # no studentId: no recipient
    broken["data"]["studentId"] = "a{b}"  # not a valid user id
    async with run_relay(postgres_dsn, backend.table, redis_url, kafka_bootstrap):
        await backend.emit(broken)
        await backend.emit(purchase(student, purchaseId="after"))
        [frame] = await events(ws, 1, timeout=10)
        assert frame["data"]["purchaseId"] == "after"
        await eventually(lambda: backend.holds(1, "failed_at IS NOT NULL"))
    failed = subprocess.run(
        processes.notify("outbox", "failed"),
        env={"NOTIFY_OUTBOX_DSN": postgres_dsn, "NOTIFY_OUTBOX_TABLE": backend.table},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert broken["eventId"] in failed
    assert "data.studentId (a recipient) is missing or not a valid user id" in failed
    await ws.close()


async def test_two_relays_keep_each_students_order(
    gateway: GatewayServer,
    backend: Backend,
    postgres_dsn: str,
    redis_url: str,
    kafka_bootstrap: str,
) -> None:
    students = [unique("s") for _ in range(20)]
    clients = [(await open_client(gateway.ws_url(s)))[0] for s in students]
    async with (
        run_relay(postgres_dsn, backend.table, redis_url, kafka_bootstrap),
        run_relay(postgres_dsn, backend.table, redis_url, kafka_bootstrap),
    ):
        for n in range(25):
            async with backend.conn.transaction():
                for student in students:
                    await backend.insert(purchase(student, purchaseId=str(n)), topic=None)
        for ws in clients:
            frames = await events(ws, 25, timeout=30)
            assert [int(f["data"]["purchaseId"]) for f in frames] == list(range(25))
    for ws in clients:
        await nothing_arrives(ws, within=0.2)
        await ws.close()
