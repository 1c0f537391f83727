"""REDIS_CLUSTER=1: three masters with sharded Pub/Sub, two gateways, two bridges, a failover.

Every test counts every event on every device: a gap is only acceptable right after a
``resync`` frame (the app is told to refetch), never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from notify import embedded, processes, redis_client
from notify.publish import Notification

from .support import (
    API_KEY,
    KEYS,
    GatewayServer,
    domain_event,
    publisher,
    recv_json,
    settings_env,
    start_gateway,
    token,
    unique,
    wait_ready,
)

CLUSTER = {"REDIS_CLUSTER": "1"}


class Device:
    """One device of a student: reconnects with ``since`` whenever its connection drops.

    ``log`` holds the ``data.sessionCount`` of each event in arrival order (-1 for events
    without one), and ``None`` where a resync frame arrived.
    """

    def __init__(self, url: Callable[[str | None], str], student: str) -> None:
        self.student = student
        self._url = url
        self.log: list[int | None] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        position: str | None = None
        while True:
            with contextlib.suppress(OSError, ConnectionClosed, InvalidStatus, TimeoutError):
                async with connect(self._url(position), open_timeout=5) as ws:
                    while True:
                        frame = await recv_json(ws, timeout=3600)
                        if frame["type"] == "welcome" and position is None:
                            position = frame["last_id"]
                        elif frame["type"] == "event":
                            self.log.append(frame["data"].get("sessionCount", -1))
                            position = frame["id"]
                        elif frame["type"] == "resync":
                            self.log.append(None)
                            position = frame["last_id"]
            await asyncio.sleep(0.1)

    @property
    def numbers(self) -> list[int]:
        return [n for n in self.log if n is not None]

    def _alive(self) -> None:
        if self.task.done():
            self.task.result()  # a device that crashed fails the test with its own error

    def assert_exactly(self, count: int) -> None:
        self._alive()
        assert self.log == list(range(count)), self.student

    def assert_never_silently_stale(self, count: int) -> None:
        """In order with no hole or repeat, except right after a resync; ends up current."""
        self._alive()
        last: int | None = None
        for n in self.log:
            if n is None:
                last = None  # the app refetches: what came before no longer matters
                continue
            assert last is None or n == last + 1, (self.student, self.log)
            last = n
        assert last == count - 1, (self.student, self.log)


def stop_all(devices: list[Device]) -> None:
    for device in devices:
        device.task.cancel()


def ws_url(gateway: GatewayServer, student: str) -> Callable[[str | None], str]:
    return lambda since: gateway.ws_url(student, since=since)


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"not in {within:.0f} s: {what}"
        await asyncio.sleep(0.05)


def shard_of(student: str, cluster: embedded.Cluster) -> int:
    """Which master serves the student: ``start_redis_cluster`` splits the slots evenly."""
    slot = key_slot(KEYS.channel(student).encode())
    return min(slot // (REDIS_CLUSTER_HASH_SLOTS // cluster.masters), cluster.masters - 1)


def spread(cluster: embedded.Cluster, count: int) -> list[str]:
    """``count`` student ids, the same number on each master."""
    students: list[str] = []
    while len(students) < count:
        student = unique("cs")
        shard = shard_of(student, cluster)
        if sum(shard_of(s, cluster) == shard for s in students) < count // cluster.masters:
            students.append(student)
    return students


async def test_two_gateways_and_two_bridges_deliver_every_event_once_through_rebalances(
    redis_cluster: embedded.Cluster, kafka_bootstrap: str
) -> None:
    topic, group = unique("cluster.events"), unique("group")
    await embedded.create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=4)

    def bridge_env() -> dict[str, str]:
        return {
            **os.environ,
            **settings_env(redis_cluster.address, **CLUSTER),
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "NOTIFY_KAFKA_TOPICS": topic,
            "NOTIFY_KAFKA_GROUP": group,
            "NOTIFY_DLQ_TOPIC": f"{topic}.dlq",
            "BRIDGE_PORT": str(embedded.free_port()),
            "NOTIFY_LOG_LEVEL": "WARNING",
        }

    students = spread(redis_cluster, 24)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    devices: list[Device] = []
    spawned: list[Any] = []

    async def produce(numbers: range) -> None:
        sends = [
            await producer.send(
                topic,
                orjson.dumps(domain_event("SESSIONS_GENERATED", studentId=s, sessionCount=n)),
                key=s.encode(),
            )
            for n in numbers
            for s in students
        ]
        await asyncio.gather(*sends)

    def delivered(count: int) -> bool:
        return all(len(device.log) >= count for device in devices)

    try:
        async with (
            start_gateway(redis_cluster.address, **CLUSTER) as one,
            start_gateway(redis_cluster.address, **CLUSTER) as two,
        ):
            # Each student has a device on each gateway.
            devices = [Device(ws_url(g, s), s) for s in students for g in (one, two)]
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:

                async def presence(student: str) -> Any:
                    answer = await http.get(f"{one.url}/api/presence/{student}")
                    return answer.json()["connections"]

                for student in students:
                    for _ in range(100):
                        if await presence(student) == 2:
                            break
                        await asyncio.sleep(0.05)
                    assert await presence(student) == 2, student  # counted across gateways

            first_env = bridge_env()
            spawned.append(processes.spawn(processes.notify("bridge"), first_env))
            await produce(range(0, 30))
            await wait_for(lambda: delivered(30), 60, "the first bridge delivers")
            # A second bridge joins the group: the partitions are shared out again.
            spawned.append(processes.spawn(processes.notify("bridge"), bridge_env()))
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{first_env['BRIDGE_PORT']}")
            await produce(range(30, 60))
            await wait_for(lambda: delivered(60), 60, "both bridges deliver")
            # The first bridge dies mid-stream: the second takes its partitions.
            produced = asyncio.create_task(produce(range(60, 90)))
            await asyncio.sleep(0.05)
            spawned[0].send_signal(signal.SIGKILL)
            await produced
            await wait_for(lambda: delivered(90), 90, "the survivor takes over")
            await asyncio.sleep(1)  # anything delivered twice would have arrived by now
            for device in devices:
                device.assert_exactly(90)
    finally:
        stop_all(devices)
        await producer.stop()
        for process in spawned:
            processes.stop(process)


@pytest.fixture
def failover_cluster() -> Iterator[embedded.Cluster]:
    """A cluster of this test's own: it loses a master."""
    cluster = embedded.start_redis_cluster(masters=3, replicas=1)
    yield cluster
    cluster.stop()


async def test_a_master_failover_leaves_no_client_silently_stale(
    failover_cluster: embedded.Cluster,
) -> None:
    cluster = failover_cluster
    students = spread(cluster, 30)
    redis = redis_client.client(cluster.address, cluster=True)
    pub = publisher(redis)
    sent: dict[str, int] = dict.fromkeys(students, 0)
    devices: list[Device] = []

    async def publish(student: str) -> None:
        """The bridge's contract: retry until Redis answers, deduplicated by event id."""
        n = sent[student]
        notification = Notification(student, "E", {"sessionCount": n}, dedupe_key=f"{student}-{n}")
        while True:
            try:
                await pub.publish(notification)
                break
            except redis_client.UNAVAILABLE:
                await asyncio.sleep(0.1)
        sent[student] = n + 1

    async def publish_rounds(rounds: int) -> None:
        for _ in range(rounds):
            await asyncio.gather(*(publish(s) for s in students))
            await asyncio.sleep(0.02)

    try:
        async with start_gateway(cluster.address, **CLUSTER) as gateway:
            devices = [Device(ws_url(gateway, s), s) for s in students]
            await wait_for(lambda: gateway.gateway.hub.connection_count == 30, 20, "connected")
            await publish_rounds(20)
            await wait_for(lambda: all(len(d.log) >= 20 for d in devices), 20, "delivered")
            # Kill the master of the first third of the slots; its replica takes over.
            victim = cluster.nodes[0]
            rounds = asyncio.create_task(publish_rounds(40))
            await asyncio.sleep(0.2)
            victim.process.send_signal(signal.SIGKILL)
            await rounds
            # Once the gateway follows the new master, events flow live again.
            await wait_for(lambda: gateway.gateway.reader.delivering, 30, "delivering again")
            await publish_rounds(5)
            await wait_for(
                lambda: all(d.numbers[-1:] == [sent[d.student] - 1] for d in devices),
                60,
                "every device current after the failover",
            )
            await asyncio.sleep(0.5)
            for device in devices:
                device.assert_never_silently_stale(sent[device.student])
            # Students on the untouched masters noticed nothing.
            survivors = [d for d in devices if shard_of(d.student, cluster) != 0]
            for device in survivors:
                device.assert_exactly(sent[device.student])
            assert gateway.gateway.reader.delivering
    finally:
        stop_all(devices)
        await redis.aclose()


async def test_concurrent_publishes_through_a_failover_fail_only_as_unavailable(
    failover_cluster: embedded.Cluster,
) -> None:
    """Every producer retries on ``UNAVAILABLE``: anything else would crash the bridge or
    answer 500. redis-py closes every node's connections on CLUSTERDOWN, including ones
    other tasks are using at that moment, so this needs many publishes in flight."""
    cluster = failover_cluster
    redis = redis_client.client(cluster.address, cluster=True)
    pub = publisher(redis)
    unexpected: list[BaseException] = []
    published = 0
    running = True

    async def publish_until_stopped(student: str) -> None:
        nonlocal published
        n = 0
        while running:
            notification = Notification(student, "E", {"n": n}, dedupe_key=str(n))
            try:
                await pub.publish(notification)
            except redis_client.UNAVAILABLE:
                await asyncio.sleep(0.05)
                continue
            except Exception as exc:
                unexpected.append(exc)
                await asyncio.sleep(0.05)
                continue
            n += 1
            published += 1

    publishers = [asyncio.create_task(publish_until_stopped(unique("s"))) for _ in range(100)]
    try:
        await asyncio.sleep(1)
        cluster.nodes[0].process.send_signal(signal.SIGKILL)
        await asyncio.sleep(8)
    finally:
        running = False
        await asyncio.gather(*publishers)
        await redis.aclose()
    assert published > 0
    assert unexpected == [], {type(exc).__name__ for exc in unexpected}


def migrate_slot(cluster: embedded.Cluster, slot: int, source: int, target: int) -> None:
    """Move ``slot`` and its keys from master ``source`` to master ``target``, as an
    operator resharding the cluster would (SETSLOT IMPORTING/MIGRATING, MIGRATE, NODE)."""
    import redis

    nodes: list[Any] = [redis.Redis(port=node.port) for node in cluster.nodes[: cluster.masters]]
    try:
        ids = [n.execute_command("CLUSTER MYID").decode() for n in nodes]
        src, dst = nodes[source], nodes[target]
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        while moving := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            port = cluster.nodes[target].port
            src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *moving)
        for node in nodes:
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
    finally:
        for node in nodes:
            node.close()


async def test_a_function_call_is_routed_without_asking_a_node_for_its_keys(
    redis_cluster: embedded.Cluster,
) -> None:
    """redis-py asks a node (COMMAND GETKEYS) where an FCALL's keys are, on every call: a
    round trip more per publish, and after a failover its dead default node failed every
    publish for a minute, before any retry or slot-map refresh. The keys are in the call."""
    nodes = [redis_client.client(node.address) for node in redis_cluster.nodes]
    redis = redis_client.client(redis_cluster.address, cluster=True)

    async def getkeys_calls() -> int:
        total = 0
        for node in nodes:
            stats = await node.info("commandstats")
            total += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
        return total

    try:
        pub = publisher(redis)
        await pub.publish(Notification(unique("s"), "E", {}))  # the library is loaded
        before = await getkeys_calls()
        students = spread(redis_cluster, 9)
        for student in students:
            await pub.publish(Notification(student, "E", {}))
        # One batch over every master: a pipeline of calls.
        await pub.invalidate_then_publish((), [Notification(s, "E", {}) for s in students])
        assert await getkeys_calls() == before
    finally:
        await redis.aclose()
        for node in nodes:
            await node.aclose()


async def test_a_slot_migration_moves_the_subscription_and_loses_nothing(
    failover_cluster: embedded.Cluster,
) -> None:
    cluster = failover_cluster
    moving, staying = spread(cluster, 3)[0], spread(cluster, 3)[1]
    redis = redis_client.client(cluster.address, cluster=True)
    pub = publisher(redis)
    devices: list[Device] = []

    async def publish(student: str, numbers: range) -> None:
        for n in numbers:
            await pub.publish(Notification(student, "E", {"sessionCount": n}))

    try:
        async with start_gateway(cluster.address, **CLUSTER) as gateway:
            devices = [Device(ws_url(gateway, s), s) for s in (moving, staying)]
            await wait_for(lambda: gateway.gateway.hub.connection_count == 2, 20, "connected")
            await publish(moving, range(10))
            await publish(staying, range(10))
            await wait_for(lambda: all(len(d.log) == 10 for d in devices), 20, "delivered")
            source = shard_of(moving, cluster)
            slot = key_slot(KEYS.channel(moving).encode())
            await asyncio.to_thread(migrate_slot, cluster, slot, source, (source + 1) % 3)
            # The old node unsubscribed the channel; the gateway finds its new home. The
            # history moved with the slot, but under a node with another replication id,
            # which the publish function cannot tell from a promoted replica: a new epoch,
            # so the moving student may get one resync (docs/operations.md).
            await publish(moving, range(10, 20))
            await publish(staying, range(10, 20))
            await wait_for(
                lambda: devices[0].numbers[-1:] == [19] or None in devices[0].log, 30, "caught up"
            )
            await publish(moving, range(20, 25))
            await publish(staying, range(20, 25))
            await wait_for(lambda: all(d.numbers[-1:] == [24] for d in devices), 30, "live again")
            await asyncio.sleep(0.5)
            devices[0].assert_never_silently_stale(25)
            devices[1].assert_exactly(25)
            assert gateway.gateway.hub.connection_count == 2  # nobody was disconnected
    finally:
        stop_all(devices)
        await redis.aclose()


async def test_the_api_publishes_a_batch_for_students_on_every_master(
    redis_cluster: embedded.Cluster,
) -> None:
    students = spread(redis_cluster, 3)
    async with start_gateway(redis_cluster.address, **CLUSTER) as gateway:
        devices = [Device(ws_url(gateway, s), s) for s in students]
        try:
            await wait_for(lambda: gateway.gateway.hub.connection_count == 3, 20, "connected")
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=gateway.url, headers=headers) as http:
                batch = [
                    {"user_id": s, "event": "E", "data": {"sessionCount": n}}
                    for n in range(5)
                    for s in students
                ]
                answer = await http.post("/api/publish", json={"notifications": batch})
                assert answer.status_code == 202, answer.text
                assert len(answer.json()["ids"]) == 15
                # Cache keys of one student may sit on any master: one DEL each.
                update = {"student_id": students[0], "course_id": "c1", "reason": "cluster"}
                answer = await http.post("/api/trigger-update", json=update)
                assert answer.status_code == 200, answer.text
            await wait_for(lambda: all(len(d.log) >= 5 for d in devices), 20, "delivered")
            await wait_for(lambda: len(devices[0].log) == 6, 20, "the trigger-update")
            for device in devices[1:]:
                device.assert_exactly(5)
        finally:
            stop_all(devices)


async def test_a_gateway_started_before_its_cluster_waits_for_it_then_delivers() -> None:
    """No node answers at first: the gateway reports not ready, and serves once one does."""
    redis_port, port = embedded.free_port(), embedded.free_port()
    address = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, **settings_env(address, PORT=str(port), **CLUSTER)}
    env["NOTIFY_LOG_LEVEL"] = "ERROR"
    command = processes.notify("gateway")
    gateway = processes.spawn(command, env, quiet=True)
    cluster: embedded.Cluster | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # the reader has failed to reach a node a few times by now
            assert (await http.get("/readyz")).status_code == 503
            cluster = await asyncio.to_thread(embedded.start_redis_cluster, 3, 0, redis_port)
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}", 30)
        student = spread(cluster, 3)[0]
        url = f"ws://127.0.0.1:{port}/ws?token={token(student)}"
        async with connect(url) as ws:
            assert (await recv_json(ws))["type"] == "welcome"
            redis = redis_client.client(address, cluster=True)
            try:
                await publisher(redis).publish(Notification(student, "E"))
            finally:
                await redis.aclose()
            assert (await recv_json(ws))["event"] == "E"
        assert gateway.poll() is None
    finally:
        processes.stop(gateway)
        if cluster is not None:
            cluster.stop()
