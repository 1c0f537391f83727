"""End-to-end latency and bridge throughput on this machine.

    .venv/bin/python bench/latency.py [--students 200] [--rate 500] [--seconds 10]

Starts valkey-server, tansu, one `notify gateway` and one `notify bridge` (the Procfile
processes), connects one WebSocket per student, then measures:

- Kafka -> WebSocket: events produced open-loop at --rate per second for --seconds; latency
  is receive time minus produce time, carried in the event.
- HTTP API -> WebSocket: the same through POST /api/publish (one request per event).
- Bridge backlog: --backlog events produced while the bridge is stopped, then the time
  from its restart to the last delivery.

Prints a markdown table. Every event is counted; "delivered" must be 100 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect

from notify_gateway import config, embedded
from notify_gateway.gateway.auth import mint

RULES = """
[BENCH_EVENT]
notification = "BENCH"
recipients = ["studentId"]
fields = ["sentAt", "n"]
"""
SECRET = "bench-" + "s" * 32
API_KEY = "bench-key-0123456789abcdef"


class Receiver:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.first_at: float | None = None
        self.last_at = 0.0

    async def read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame.get("type") != "event":
                continue
            now = time.time()
            self.first_at = self.first_at or now
            self.last_at = now
            self.latencies.append((now - frame["data"]["sentAt"]) * 1000)


def row(name: str, sent: int, receiver: Receiver, extra: str = "") -> str:
    lat = sorted(receiver.latencies)
    got = len(lat)

    def pct(p: float) -> float:
        return lat[min(got - 1, int(got * p))] if got else float("nan")

    return (
        f"| {name} | {sent} | {100 * got / sent:.2f} % | {pct(0.5):.1f} | {pct(0.99):.1f} "
        f"| {lat[-1] if lat else float('nan'):.1f} | {extra} |"
    )


async def wait_for(receiver: Receiver, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.latencies) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    redis, kafka = embedded.start_redis(), embedded.start_kafka()
    rules = Path(tempfile.mkdtemp()) / "rules.toml"
    rules.write_text(RULES)
    port = embedded.free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis.address,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.address,
        "NOTIFY_JWT_SECRET": SECRET,
        "NOTIFY_API_KEYS": f"bench={API_KEY}",
        "NOTIFY_API_RATE_LIMIT": "1000000",
        "NOTIFY_RULES": str(rules),
        "NOTIFY_HOST": "127.0.0.1",
        "PORT": str(port),
        "BRIDGE_PORT": str(embedded.free_port()),
        "NOTIFY_LOG_LEVEL": "WARNING",
    }
    kafka_settings = config.load_kafka(env)
    await embedded.create_topics(kafka.address, [*kafka_settings.topics, kafka_settings.dlq_topic])
    topic = kafka_settings.topics[0]
    cli = [sys.executable, "-m", "notify_gateway.cli"]
    gateway = embedded.spawn([*cli, "gateway"], env)
    bridge = embedded.spawn([*cli, "bridge"], env)
    jwt = config.load_jwt(env)
    students = [f"bench-{i}" for i in range(args.students)]
    try:
        await asyncio.sleep(1.5)
        sockets = [
            await connect(f"ws://127.0.0.1:{port}/ws?token={mint(jwt, s, 3600)}") for s in students
        ]
        for ws in sockets:
            await ws.recv()  # welcome
        receiver = Receiver()
        readers = [asyncio.create_task(receiver.read(ws)) for ws in sockets]
        producer = AIOKafkaProducer(bootstrap_servers=kafka.address, linger_ms=1)
        await producer.start()

        async def produce(n: int) -> None:
            student = students[n % len(students)]
            event = {"eventId": f"e{n}", "eventType": "BENCH_EVENT",
                     "data": {"studentId": student, "sentAt": time.time(), "n": n}}  # fmt: skip
            await producer.send(topic, orjson.dumps(event), key=student.encode())

        # Warm-up: the bridge joins its group, every path is exercised once.
        await produce(-1)
        await wait_for(receiver, 1, 60)
        receiver.latencies.clear()

        total = args.rate * args.seconds
        start = time.monotonic()
        for n in range(total):
            delay = start + n / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await produce(n)
        await producer.flush()
        await wait_for(receiver, total, 30)
        kafka_row = row("Kafka → bridge → WebSocket", total, receiver, f"{args.rate}/s open loop")

        api = Receiver()
        for task in readers:
            task.cancel()
        readers = [asyncio.create_task(api.read(ws)) for ws in sockets]
        api_total = min(total, args.rate * 4)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as http:
            start = time.monotonic()
            for n in range(api_total):
                body: dict[str, Any] = {
                    "user_id": students[n % len(students)],
                    "event": "BENCH",
                    "data": {"sentAt": time.time(), "n": n},
                }
                await http.post("/api/publish", json=body)
            api_rate = api_total / (time.monotonic() - start)
        await wait_for(api, api_total, 30)
        api_row = row("HTTP API → WebSocket", api_total, api, f"{api_rate:.0f}/s, one client")

        # Bridge backlog: events wait in Kafka while the bridge is down.
        embedded.stop(bridge)
        backlog = Receiver()
        for task in readers:
            task.cancel()
        readers = [asyncio.create_task(backlog.read(ws)) for ws in sockets]
        for n in range(args.backlog):
            await produce(1_000_000 + n)
        await producer.flush()
        restarted = time.time()
        bridge = embedded.spawn([*cli, "bridge"], env)
        await wait_for(backlog, args.backlog, 120)
        elapsed = backlog.last_at - (backlog.first_at or restarted)
        throughput = len(backlog.latencies) / elapsed if elapsed > 0 else float("nan")
        backlog_row = (
            f"| bridge backlog drain | {args.backlog} | "
            f"{100 * len(backlog.latencies) / args.backlog:.2f} % | | | | "
            f"{throughput:.0f} events/s from first to last delivery |"
        )
        await producer.stop()
        for task in readers:
            task.cancel()
        print(f"\n{args.students} students connected, one gateway and one bridge process\n")
        print("| path | events | delivered | p50 ms | p99 ms | max ms | notes |")
        print("|---|---:|---:|---:|---:|---:|---|")
        print(kafka_row)
        print(api_row)
        print(backlog_row)
    finally:
        for process in (bridge, gateway):
            embedded.stop(process)
        kafka.stop()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--backlog", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
