"""The chaos harness: the real stack as processes, simulated students, and a full account.

Every event the harness produces carries its student's sequence number. Each simulated
device follows docs/protocol.md (resume with ``since``, reconnect with full-jitter backoff,
rotate gateways like a load balancer would) and records what it received. The account then
classifies every produced event of every student:

- delivered: received exactly once, in order;
- resynced: not received, and lying between the last event received before a ``resync``
  and the first one received after it (the device reloads its stores; the stream is in
  order, so later events cannot fill that window). A trailing resync covers only events
  produced before it arrived. A hole that opens before a resync is lost, not resynced;
- duplicate / reordered: received again, or after a later one;
- lost: none of the above. The promise is that this is always 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bridge.outbox import admin
from gateway.auth import mint
from notify import config, embedded, processes

from ..support import TcpProxy, settings_env

RULES = """
[CHAOS_EVENT]
notification = "CHAOS"
recipients = ["studentId"]
fields = ["n", "sentAt", "pad"]
"""
TOPIC = "chaos.events"
# An event type without a rule, which the harness writes to Kafka for itself.
MARKER = "CHAOS_MARKER"
# Soak runs: CHAOS_SCALE=10 streams ten times longer in every scenario.
SCALE = float(os.environ.get("CHAOS_SCALE", "1"))


@dataclass
class Stack:
    """valkey-server, tansu behind a proxy, two gateways and a bridge, as processes."""

    env: dict[str, str]
    redis: embedded.Server
    kafka: embedded.Server
    proxy: TcpProxy
    gateway_ports: list[int]
    gateways: list[subprocess.Popen[bytes] | None]
    bridge: subprocess.Popen[bytes] | None = None
    # How Redis runs (its command-line options) and where it keeps its files.
    redis_args: tuple[str, ...] = ()
    redis_dir: str = ""
    # With a replica: every process reaches Redis through this proxy, which a failover
    # points at the replica.
    replica: embedded.Server | None = None
    redis_proxy: TcpProxy | None = None
    # With an outbox: PostgreSQL (and its data directory) and two relays.
    postgres: embedded.Server | None = None
    postgres_dir: str = ""
    relays: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    # Each process's output (warnings and up), shown with a failed scenario.
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp()))

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.gateway_ports]

    def spawn(self, what: str, **extra: str) -> subprocess.Popen[bytes]:
        command = processes.notify(what)
        started = len(list(self.logs.glob(f"{what}-*.log")))
        with (self.logs / f"{what}-{started}.log").open("ab") as log:
            return processes.spawn(command, {**self.env, **extra}, log=log)

    def print_logs(self, lines: int = 40) -> None:
        """The last lines each process wrote, for the report of a failed scenario."""
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {path.name} (last {len(tail)} lines) -----", *tail, sep="\n")

    def start_gateway(self, index: int) -> None:
        self.gateways[index] = self.spawn("gateway", PORT=str(self.gateway_ports[index]))

    def kill_gateway(self, index: int, sig: int = signal.SIGKILL) -> None:
        process = self.gateways[index]
        if process is not None:
            process.send_signal(sig)
            process.wait(15)
            self.gateways[index] = None

    def start_bridge(self) -> None:
        self.bridge = self.spawn("bridge")

    def kill_bridge(self) -> None:
        if self.bridge is not None:
            self.bridge.send_signal(signal.SIGKILL)
            self.bridge.wait()
            self.bridge = None

    def start_relays(self, count: int) -> None:
        self.relays = [
            self.spawn("outbox", OUTBOX_PORT=str(embedded.free_port())) for _ in range(count)
        ]

    def kill_relay(self, index: int) -> None:
        process = self.relays[index]
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            self.relays[index] = None

    def restart_postgres(self) -> None:
        """A fast shutdown (every session cut) and a start on the same data."""
        assert self.postgres is not None
        self.postgres.stop()
        self.postgres = embedded.start_postgres(self.postgres.port, self.postgres_dir)

    def restart_redis(self) -> None:
        """Stop Redis cleanly and start it again on the same port and files: what it
        persisted, if anything, is back."""
        self.redis.stop()
        self.redis = embedded.start_redis(self.redis.port, self.redis_args, self.redis_dir)

    async def fail_over(self, lag: float) -> None:
        """Promote the replica, keep the primary taking writes for ``lag`` seconds (the
        replica misses them, as asynchronous replication does), then move every client to
        the replica and stop the primary."""
        assert self.replica is not None
        assert self.redis_proxy is not None
        async with Redis(port=self.replica.port) as replica:
            await replica.replicaof("NO", "ONE")
        await asyncio.sleep(lag)
        self.redis_proxy.upstream = self.replica.port
        await self.redis_proxy.cut()
        self.redis.stop()
        await self.redis_proxy.restore()

    def stop(self) -> None:
        for process in [*self.gateways, self.bridge, *self.relays]:
            if process is not None:
                processes.stop(process)
        self.kafka.process.send_signal(signal.SIGCONT)
        self.kafka.stop()
        self.redis.stop()
        if self.replica is not None:
            self.replica.stop()
        if self.postgres is not None:
            self.postgres.stop()


@contextlib.asynccontextmanager
async def stack(
    redis_args: tuple[str, ...] = (), replica: bool = False, outbox: bool = False
) -> AsyncIterator[Stack]:
    redis_dir = tempfile.mkdtemp()
    redis = embedded.start_redis(args=redis_args, workdir=redis_dir)
    redis_address, redis_proxy, replica_server = redis.address, None, None
    if replica:
        replica_server = embedded.start_redis(
            args=(*redis_args, "--replicaof", "127.0.0.1", str(redis.port)),
            workdir=tempfile.mkdtemp(),
        )
        redis_proxy = TcpProxy(embedded.free_port(), redis.port)
        await redis_proxy.start()
        redis_address = f"redis://127.0.0.1:{redis_proxy.port}/0"
    proxy_port = embedded.free_port()
    kafka = embedded.start_kafka(advertised_port=proxy_port)
    proxy = TcpProxy(proxy_port, kafka.port)
    await proxy.start()
    rules = Path(tempfile.mkdtemp()) / "rules.toml"
    rules.write_text(RULES)
    env = {
        **os.environ,
        **settings_env(redis_address),
        "KAFKA_BOOTSTRAP_SERVERS": kafka.address,
        "NOTIFY_KAFKA_TOPICS": TOPIC,
        "NOTIFY_KAFKA_GROUP": "chaos-bridge",
        "NOTIFY_RULES": str(rules),
        "NOTIFY_HISTORY_SIZE": "1000",
        # Small enough that a phone that stops reading overflows within seconds.
        "NOTIFY_SEND_QUEUE_BYTES": str(256 * 1024),
        "NOTIFY_API_RATE_LIMIT": "1000000",
        "BRIDGE_PORT": str(embedded.free_port()),
        "NOTIFY_LOG_LEVEL": "WARNING",
    }
    await embedded.create_topics(kafka.address, [TOPIC, "notify.dlq"], partitions=3)
    ports = [embedded.free_port(), embedded.free_port()]
    running = Stack(
        env,
        redis,
        kafka,
        proxy,
        ports,
        [None, None],
        redis_args=redis_args,
        redis_dir=redis_dir,
        replica=replica_server,
        redis_proxy=redis_proxy,
    )
    if outbox:
        running.postgres_dir = tempfile.mkdtemp()
        running.postgres = embedded.start_postgres(datadir=running.postgres_dir)
        running.env["NOTIFY_OUTBOX_DSN"] = running.postgres.address
        running.env["NOTIFY_OUTBOX_IDEMPOTENT"] = "0"  # tansu has no InitProducerId
        await admin.init(config.load_outbox_table(running.env))
    try:
        running.start_gateway(0)
        running.start_gateway(1)
        running.start_bridge()
        yield running
    finally:
        # Stopped while the proxies, which run in this loop, still pass traffic: a process
        # that says goodbye to Kafka or Redis would otherwise wait out its timeouts.
        await asyncio.to_thread(running.stop)
        await proxy.cut()
        if redis_proxy is not None:
            await redis_proxy.cut()
        # Captured: pytest shows it with a failed scenario only.
        running.print_logs()


@dataclass
class Device:
    """One student's phone, following the documented reconnect and resume algorithm."""

    student: str
    urls: list[str]
    token: str
    # ("e", n) for each event received; ("r", produced) for each resync, with the number of
    # events produced for this student when it arrived.
    items: list[tuple[str, int]] = field(default_factory=list)
    produced: Callable[[], int] = lambda: 0
    last_id: str | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0
    closes: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reading.set()

    async def run(self) -> None:
        attempt, which = 0, random.randrange(len(self.urls))
        while True:
            url = self.urls[which % len(self.urls)] + f"?token={self.token}"
            if self.last_id is not None:
                url += f"&since={self.last_id}"
            try:
                async with connect(url, max_queue=4, open_timeout=10) as ws:
                    attempt = 0
                    self.connects += 1
                    await self._read(ws)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", 0)
                self.closes[code] = self.closes.get(code, 0) + 1
            self.connected.clear()
            which += 1  # the load balancer sends the retry elsewhere
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(30.0, 0.5 * 2**attempt)))

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            await self.reading.wait()
            frame: dict[str, Any] = orjson.loads(raw)
            kind = frame["type"]
            if kind == "welcome":
                if self.last_id is None:
                    self.last_id = frame["last_id"]
                self.connected.set()
            elif kind == "event":
                self.items.append(("e", frame["data"]["n"]))
                self.latencies.append(time.time() * 1000 - frame["ts"])
                self.last_id = frame["id"]
            elif kind == "resync":
                self.items.append(("r", self.produced()))
                self.last_id = frame["last_id"]


@dataclass
class Figures:
    produced: int = 0
    delivered: int = 0
    duplicates: int = 0
    reordered: int = 0
    resynced: int = 0
    lost: int = 0
    resync_frames: int = 0

    def add(self, other: Figures) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def account(produced: int, items: list[tuple[str, int]]) -> Figures:
    """Classify events 0..produced-1 from what one device received (see the module doc)."""
    figures = Figures(produced=produced)
    seen: set[int] = set()
    covered: set[int] = set()
    highest = -1
    # Open resync window: the highest event received before it, and how many events had
    # been produced when the (last) resync of the window arrived.
    window: tuple[int, int] | None = None
    for kind, n in items:
        if kind == "r":
            figures.resync_frames += 1
            window = (highest if window is None else window[0], n)
        elif n in seen:
            figures.duplicates += 1
        else:
            if n < highest:
                figures.reordered += 1
            if window is not None:
                covered.update(range(window[0] + 1, n))
                window = None
            seen.add(n)
            highest = max(highest, n)
    if window is not None:
        covered.update(range(window[0] + 1, window[1]))
    for n in range(produced):
        if n in seen:
            figures.delivered += 1
        elif n in covered:
            figures.resynced += 1
        else:
            figures.lost += 1
    return figures


class Run:
    """Students streaming numbered events through Kafka while the test breaks things."""

    def __init__(self, running: Stack, students: int, pad: int = 0) -> None:
        self.stack = running
        jwt = config.load_jwt(running.env)
        names = [f"chaos-{i}-{random.randrange(1 << 30)}" for i in range(students)]
        self.devices = [Device(s, running.urls, mint(jwt, s, 3600)) for s in names]
        self.sent = {d.student: 0 for d in self.devices}
        for device in self.devices:
            device.produced = functools.partial(self.sent.__getitem__, device.student)
        self.pad = "x" * pad
        self._tasks: list[asyncio.Task[None]] = []
        self._producer = AIOKafkaProducer(
            bootstrap_servers=running.kafka.address,
            linger_ms=5,
            # A Kafka cut must delay the stream, not fail it: producers buffer meanwhile.
            request_timeout_ms=180_000,
        )

    async def start(self) -> None:
        await self._producer.start()
        self._tasks = [asyncio.create_task(d.run()) for d in self.devices]
        await self.wait_connected(60)

    async def wait_connected(self, within: float) -> None:
        async with asyncio.timeout(within):
            for device in self.devices:
                await device.connected.wait()

    async def stream(self, seconds: float, rate: int) -> None:
        """Produce ``rate`` events per second, round-robin over students, open loop."""
        start, count = time.monotonic(), int(seconds * SCALE * rate)
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            device = self.devices[i % len(self.devices)]
            n = self.sent[device.student]
            self.sent[device.student] = n + 1
            data = {"studentId": device.student, "n": n, "sentAt": time.time()}
            if self.pad:
                data["pad"] = self.pad
            event = {"eventId": f"{device.student}:{n}", "eventType": "CHAOS_EVENT", "data": data}
            await self._producer.send(TOPIC, orjson.dumps(event), key=device.student.encode())

    async def settle(self, within: float = 120) -> Figures:
        """Wait until every event is accounted for (or the time is up); then count."""
        await self._producer.flush()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.figures().lost == 0:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1)  # late duplicates would show up now
        return self.figures()

    def figures(self) -> Figures:
        total = Figures()
        for device in self.devices:
            total.add(account(self.sent[device.student], device.items))
        return total

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._producer.stop()


class Rollback(Exception):
    """A payment service's transaction that is undone on purpose."""


class OutboxRun(Run):
    """Students whose events a payment service commits through the outbox, 4 writers at once.

    Each student's events come from one writer, one transaction each, so their order is
    the commit order. A transaction is rolled back on purpose every ``rollback`` (the event
    is then written again, with the same number, in the next one): a rolled-back row that
    notified would show up as a duplicate.
    """

    WRITERS = 4

    def __init__(self, running: Stack, students: int) -> None:
        super().__init__(running, students)
        self.rolled_back = 0
        assert running.postgres is not None
        self._table = config.load_outbox_table(running.env).table

    async def stream(self, seconds: float, rate: float, rollback: float = 0.1) -> None:
        count = round(seconds * SCALE * rate)
        writers = [
            self._writer(
                self.devices[w :: self.WRITERS],
                count // self.WRITERS,
                rate / self.WRITERS,
                rollback,
            )
            for w in range(self.WRITERS)
        ]
        await asyncio.gather(*writers)

    async def _writer(
        self, devices: list[Device], count: int, rate: float, rollback: float
    ) -> None:
        conn: Any = None
        start, i = time.monotonic(), 0
        while i < count:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            device = devices[i % len(devices)]
            n = self.sent[device.student]
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.stack.env["NOTIFY_OUTBOX_DSN"])
                if await self._commit(conn, device.student, n, random.random() < rollback):
                    self.sent[device.student] = n + 1
                    i += 1
                else:
                    self.rolled_back += 1
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
            ):
                # PostgreSQL restarting: the backend retries its transaction, as this does.
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.2)
        if conn is not None:
            await conn.close()

    async def _commit(self, conn: Any, student: str, n: int, undo: bool) -> bool:
        """One business transaction with its outbox row; False if it was rolled back."""
        event_id = f"{student}:{n}"
        data = {"studentId": student, "n": n, "sentAt": time.time()}
        event = {"eventId": event_id, "eventType": "CHAOS_EVENT", "data": data}
        try:
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {self._table} (event_id, event_type, key, payload, topic)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    event_id,
                    "CHAOS_EVENT",
                    student,
                    orjson.dumps(event).decode(),
                    TOPIC,
                )
                if undo:
                    raise Rollback
        except Rollback:
            return False
        except asyncpg.UniqueViolationError:
            pass  # the commit went through before its answer was lost: it is there
        return True

    async def whereabouts(self) -> str:
        """Where the committed events stand, for the report of a scenario that timed out:
        the rows each stage has still to do, the failed ones and why, what Kafka holds,
        and which relays still run."""
        conn = await asyncpg.connect(self.stack.env["NOTIFY_OUTBOX_DSN"])
        try:
            rows = await conn.fetchrow(
                f"""
                SELECT count(*) FILTER (WHERE notified_at IS NULL AND failed_at IS NULL),
                       count(*) FILTER (WHERE forwarded_at IS NULL AND failed_at IS NULL),
                       count(*) FILTER (WHERE failed_at IS NOT NULL), min(failure)
                FROM {self._table}
                """
            )
        finally:
            await conn.close()
        distinct, duplicates, _ = await self.forwarded()
        exits = [None if relay is None else relay.poll() for relay in self.stack.relays]
        return (
            f"committed {sum(self.sent.values())}; in Kafka {distinct} (+{duplicates} copies);"
            f" rows to notify {rows[0]}, to forward {rows[1]}, failed {rows[2]} ({rows[3]});"
            f" relays' exit codes {exits}"
        )

    async def forwarded(self) -> tuple[int, int, int]:
        """What Kafka holds of the committed events: (distinct, duplicates, out of order).

        A marker event (no rule: the bridge skips it) goes to each partition first. tansu
        reports a partition's end as the base offset of its last record batch plus one, not
        the next offset, and a CI run once found 344 acknowledged events unreadable with
        nothing left to forward; an append moves the end past every batch before it. On
        Apache Kafka the marker changes nothing.
        """
        await self._mark_partitions()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.stack.kafka.address, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            partitions = [
                TopicPartition(TOPIC, p) for p in consumer.partitions_for_topic(TOPIC) or []
            ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            seen: dict[str, list[int]] = {}
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    for message in messages:
                        event = orjson.loads(message.value)
                        if event["eventType"] == MARKER:
                            continue
                        data = event["data"]
                        seen.setdefault(data["studentId"], []).append(data["n"])
        finally:
            await consumer.stop()
        distinct = sum(len(set(numbers)) for numbers in seen.values())
        duplicates = sum(len(numbers) - len(set(numbers)) for numbers in seen.values())
        reordered = sum(_out_of_order(numbers) for numbers in seen.values())
        return distinct, duplicates, reordered

    async def _mark_partitions(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.kafka.address, acks="all")
        await producer.start()
        try:
            for partition in await producer.partitions_for(TOPIC):
                marker = {"eventId": f"marker-{time.time_ns()}", "eventType": MARKER, "data": {}}
                await producer.send_and_wait(TOPIC, orjson.dumps(marker), partition=partition)
        finally:
            await producer.stop()


def _out_of_order(numbers: list[int]) -> int:
    """First appearances that come after a higher number (a re-sent copy is not one)."""
    highest, count, seen = -1, 0, set()
    for n in numbers:
        if n in seen:
            continue
        seen.add(n)
        if n < highest:
            count += 1
        highest = max(highest, n)
    return count
