"""The bridge against a real Kafka-protocol broker, a real Redis and real WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from bridge import rules
from bridge.consumer import Bridge
from notify import config, embedded
from notify.publish import Notification

from .support import (
    KEYS,
    GatewayServer,
    domain_event,
    events,
    nothing_arrives,
    open_client,
    produce,
    publisher,
    unique,
)


@dataclass
class RunningBridge:
    topic: str
    dlq: str
    group: str
    bridge: Bridge


@contextlib.asynccontextmanager
async def run_bridge(
    redis_url: str,
    bootstrap: str,
    topic: str | None = None,
    group: str | None = None,
    create: bool = True,
) -> AsyncIterator[RunningBridge]:
    """A Bridge in this event loop, on a topic (3 partitions) and group of its own."""
    topic = topic or unique("events")
    dlq = f"{topic}.dlq"
    group = group or unique("group")
    if create:
        await embedded.create_topics(bootstrap, [topic, dlq])
    settings = config.load_bridge(
        {
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "NOTIFY_KAFKA_TOPICS": topic,
            "NOTIFY_KAFKA_GROUP": group,
            "NOTIFY_DLQ_TOPIC": dlq,
        }
    )
    stop = asyncio.Event()
    bridge = Bridge(settings, rules.load(None))
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield RunningBridge(topic, dlq, group, bridge)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found) < count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                found.extend(messages)
        return found
    finally:
        await consumer.stop()


CatalogueRow = tuple[str, dict[str, Any], str, list[str], list[str]]
CATALOGUE: list[CatalogueRow] = [
    (
        "PURCHASE_CREATED",
        {"purchaseId": "p1", "courseId": "c1", "purchaseTier": 30, "startDate": "2026-01-09",
         "timeSlot": "06:00"},
        "COURSE_PURCHASED", ["home", "learning"], ["home", "learning"],
    ),
    (
        "PURCHASE_CONFIRMED", {"paymentId": "pay1", "courseId": "c1", "amount": 360000},
        "PAYMENT_CONFIRMED", ["home"], ["home"],
    ),
    (
        "TRAINER_ALLOCATED", {"allocationId": "a1", "courseId": "c1", "trainerId": "t1"},
        "TRAINER_ALLOCATED", ["home", "learning"], ["home", "learning"],
    ),
    (
        "SESSIONS_GENERATED", {"courseId": "c1", "allocationId": "a1", "sessionCount": 30},
        "SESSIONS_GENERATED", ["learning", "home"], ["home", "learning"],
    ),
    (
        "ALLOCATION_UPDATED", {"allocationId": "a1", "trainerId": "t2", "timeSlot": "07:00"},
        "ALLOCATION_UPDATED", ["home", "learning"], ["home", "learning"],
    ),
]  # fmt: skip


async def test_every_catalogue_row_end_to_end(
    gateway: GatewayServer, redis: Redis, redis_url: str, kafka_bootstrap: str
) -> None:
    students = [unique("student") for _ in CATALOGUE]
    clients = [(await open_client(gateway.ws_url(s)))[0] for s in students]
    for student in students:
        await redis.mset({f"student:{view}:{student}": "stale" for view in ("home", "learning")})
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        for student, (event_type, data, *_) in zip(students, CATALOGUE, strict=True):
            event = domain_event(event_type, studentId=student, **data)
            await produce(kafka_bootstrap, bridge.topic, [event], key=student)
        for ws, student, row in zip(clients, students, CATALOGUE, strict=True):
            _type, data, notification, invalidate, deleted = row
            [frame] = await events(ws, 1, timeout=30)
            assert frame["event"] == notification
            assert frame["data"] == data
            assert frame["invalidate"] == invalidate
            for view in ("home", "learning"):
                exists = await redis.exists(f"student:{view}:{student}")
                assert exists == (view not in deleted), (notification, view)
        metrics = bridge.bridge.metrics
        assert metrics.published.labels("COURSE_PURCHASED")._value.get() == 1
        assert metrics.cache_keys_deleted._value.get() == 9


async def test_purchase_created_reaches_the_student_and_clears_the_cache(
    gateway: GatewayServer, redis: Redis, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    cache_keys = [f"student:home:{student}", f"student:learning:{student}"]
    await redis.mset(dict.fromkeys(cache_keys, "stale"))
    ws, _ = await open_client(gateway.ws_url(student))
    other, _ = await open_client(gateway.ws_url(student + "-other"))
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        await produce(
            kafka_bootstrap,
            bridge.topic,
            [
                domain_event(
                    "PURCHASE_CREATED",
                    studentId=student,
                    courseId="c1",
                    purchaseId="p1",
                    purchaseTier=30,
                    startDate="2026-01-09",
                    timeSlot="06:00",
                )
            ],
            key=student,
        )
        [frame] = await events(ws, 1, timeout=30)
    assert frame["event"] == "COURSE_PURCHASED"
    assert frame["data"] == {
        "purchaseId": "p1",
        "courseId": "c1",
        "purchaseTier": 30,
        "startDate": "2026-01-09",
        "timeSlot": "06:00",
    }
    assert frame["invalidate"] == ["home", "learning"]
    assert await redis.exists(*cache_keys) == 0
    await nothing_arrives(other)


async def test_redelivered_event_is_not_notified_twice(
    gateway: GatewayServer, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    event = domain_event("TRAINER_ALLOCATED", studentId=student, allocationId="a1", trainerId="t1")
    # Another producer's event that happens to reuse the id: a different event, notified.
    other = domain_event(
        "SESSIONS_GENERATED", event["eventId"], studentId=student, courseId="c1", sessionCount=3
    )
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        # The same eventId twice, as after a crash between publish and commit.
        await produce(kafka_bootstrap, bridge.topic, [event, event, other], key=student)
        frames = await events(ws, 2, timeout=30)
        await nothing_arrives(ws, within=1.0)
        assert bridge.bridge.metrics.deduplicated._value.get() == 1
    assert [frame["event"] for frame in frames] == ["TRAINER_ALLOCATED", "SESSIONS_GENERATED"]


async def test_poison_messages_are_dead_lettered_and_the_stream_goes_on(
    gateway: GatewayServer, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    ws, _ = await open_client(gateway.ws_url(student))
    poison: list[dict[str, object] | bytes] = [
        b"not json",
        {"eventType": "PURCHASE_CREATED", "data": {"studentId": student}},
        domain_event("PURCHASE_CREATED", courseId="no-student"),
    ]
    good = domain_event("SESSIONS_GENERATED", studentId=student, sessionCount=30)
    unknown = domain_event("SOMETHING_NEW", studentId=student)
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        await produce(kafka_bootstrap, bridge.topic, [*poison, unknown, good], key=student)
        [frame] = await events(ws, 1, timeout=30)
        letters = await read_topic(kafka_bootstrap, bridge.dlq, 3)
        assert bridge.bridge.metrics.unknown_type._value.get() == 1
    assert frame["event"] == "SESSIONS_GENERATED"
    assert len(letters) == 3
    reasons = sorted(dict(m.headers)["notify-dlq-reason"].decode() for m in letters)
    assert reasons[:2] == [
        "data.studentId (a recipient) is missing or not a valid user id",
        "eventId is missing",
    ]
    assert reasons[2].startswith("value is not JSON")
    for message in letters:
        headers = dict(message.headers)
        assert headers["notify-dlq-topic"] == bridge.topic.encode()
        assert message.key == student.encode()
    assert {m.value for m in letters} == {
        b"not json",
        *(orjson.dumps(p) for p in poison[1:]),
    }


async def test_events_redis_rejects_or_json_cannot_encode_are_dead_lettered(
    gateway: GatewayServer, redis: Redis, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    """Errors tied to one event set it aside; the partition does not stall behind it."""
    broken = student + "-broken"
    await publisher(redis).publish(Notification(broken, "E"))
    await redis.set(KEYS.history(broken), "not a list")  # WRONGTYPE for the publish function
    # orjson reads this depth (a copied field) but cannot write it back.
    deep = b'{"eventId":"%s","eventType":"SESSIONS_GENERATED","data":{"studentId":"%s",' % (
        unique("evt").encode(),
        student.encode(),
    ) + b'"courseId":%s}}' % (b"[" * 300 + b"1" + b"]" * 300)
    ws, _ = await open_client(gateway.ws_url(student))
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        await produce(
            kafka_bootstrap,
            bridge.topic,
            [
                domain_event("SESSIONS_GENERATED", studentId=broken, sessionCount=1),
                deep,
                domain_event("SESSIONS_GENERATED", studentId=student, sessionCount=2),
            ],
            key=student,
        )
        [frame] = await events(ws, 1, timeout=30)
        letters = await read_topic(kafka_bootstrap, bridge.dlq, 2)
    assert frame["data"] == {"sessionCount": 2}
    reasons = sorted(dict(m.headers)["notify-dlq-reason"].decode() for m in letters)
    assert reasons[0].startswith("data cannot be encoded as JSON")
    assert reasons[1].startswith("redis rejected the event's work: WRONGTYPE")


async def test_a_replay_after_the_dedupe_window_notifies_nothing(
    gateway: GatewayServer, redis: Redis, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    """Review item 8: a new consumer group (or an offset reset, or expired group offsets)
    replays what the topic retains, up to 7 days by default; dedupe keys live 24 h. The
    partition's mark covers every message handled, not only those notified: what was set
    aside or needed nothing is not handled again either."""
    ws, _ = await open_client(gateway.ws_url(student))
    sent = [domain_event("SESSIONS_GENERATED", studentId=student, sessionCount=n) for n in range(3)]
    odd: list[dict[str, Any] | bytes] = [
        b"not json",
        domain_event("NOT_IN_THE_CATALOGUE", studentId=student),
    ]
    async with run_bridge(redis_url, kafka_bootstrap) as first:
        await produce(kafka_bootstrap, first.topic, [*sent, *odd], key=student)
        assert len(await events(ws, 3, timeout=30)) == 3
        await read_topic(kafka_bootstrap, first.dlq, 1)
    # Days later: the dedupe keys have expired.
    async for key in redis.scan_iter(match=KEYS.dedupe(student, "*")):
        await redis.delete(key)
    async with run_bridge(redis_url, kafka_bootstrap, topic=first.topic, create=False) as replay:
        later = domain_event("SESSIONS_GENERATED", studentId=student, sessionCount=3)
        await produce(kafka_bootstrap, first.topic, [later], key=student)
        [frame] = await events(ws, 1, timeout=30)
        assert frame["data"] == {"sessionCount": 3}
        await nothing_arrives(ws, within=1.0)
        metrics = replay.bridge.metrics
        assert metrics.deduplicated._value.get() == 5
        assert metrics.unknown_type._value.get() == 0
        letters = [s for m in metrics.dead_lettered.collect() for s in m.samples]
        assert sum(s.value for s in letters if s.name.endswith("_total")) == 0


async def test_a_dead_letter_too_large_for_kafka_is_set_aside_truncated(
    gateway: GatewayServer, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    """Review item 9: the dead letter (value plus headers) went over the producer's 1 MiB
    limit, the send was retried forever and every partition stayed paused."""
    from aiokafka import AIOKafkaProducer

    ws, _ = await open_client(gateway.ws_url(student))
    huge = b"x" * (1024 * 1024 - 150)  # under 1 MiB, but not with the dead-letter headers
    async with run_bridge(redis_url, kafka_bootstrap) as bridge:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=2 << 20)
        await producer.start()
        try:
            await producer.send_and_wait(bridge.topic, huge, key=student.encode(), partition=0)
            good = domain_event("SESSIONS_GENERATED", studentId=student, sessionCount=1)
            await producer.send_and_wait(bridge.topic, orjson.dumps(good), partition=0)
        finally:
            await producer.stop()
        [frame] = await events(ws, 1, timeout=30)
        [letter] = await read_topic(kafka_bootstrap, bridge.dlq, 1)
        assert bridge.bridge.metrics.dead_letters_truncated._value.get() == 1
    assert frame["data"] == {"sessionCount": 1}
    headers = dict(letter.headers)
    assert headers["notify-dlq-truncated"] == str(len(huge)).encode()
    assert headers["notify-dlq-reason"].startswith(b"value is not JSON")
    assert headers["notify-dlq-offset"] == b"0"
    assert letter.value == huge[:16_384]


async def test_an_event_redis_keeps_rejecting_is_set_aside_after_three_attempts(
    gateway: GatewayServer, redis: Redis, redis_url: str, kafka_bootstrap: str, student: str
) -> None:
    """Review item 9: any per-event Redis error but WRONGTYPE was retried forever."""
    tampered = student + "-tampered"
    # An ACL that lets the bridge append to this student's history only: each publish for
    # the other fails with an ACL failure, an answer about the event that is not WRONGTYPE.
    user = f"bridge-{student}"
    await redis.acl_setuser(
        user, enabled=True, passwords=["+pw"], categories=["+@all"], commands=["-rpush"],
        keys=["*"], channels=["*"], selectors=[("+rpush", KEYS.history(student))],
    )  # fmt: skip
    limited = redis_url.replace("redis://", f"redis://{user}:pw@")
    ws, _ = await open_client(gateway.ws_url(student))
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(redis.acl_deluser, user)
        bridge = await cleanup.enter_async_context(run_bridge(limited, kafka_bootstrap))
        await produce(
            kafka_bootstrap,
            bridge.topic,
            [
                domain_event("SESSIONS_GENERATED", studentId=tampered, sessionCount=1),
                domain_event("SESSIONS_GENERATED", studentId=student, sessionCount=2),
            ],
            key=student,
        )
        [frame] = await events(ws, 1, timeout=30)
        [letter] = await read_topic(kafka_bootstrap, bridge.dlq, 1)
    assert frame["data"] == {"sessionCount": 2}
    reason = dict(letter.headers)["notify-dlq-reason"].decode()
    assert reason.startswith("redis rejected the event's work: ERR ACL failure")
