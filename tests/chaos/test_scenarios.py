"""Chaos scenarios against the real stack; each one counts every event (see harness.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from redis.asyncio import Redis

from .harness import TOPIC, Figures, OutboxRun, Run, Stack, stack
from .report import record

KAFKA_CUT_SECONDS = float(os.environ.get("CHAOS_KAFKA_CUT_SECONDS", "60"))


@pytest.fixture
async def chaos() -> AsyncIterator[Stack]:
    async with stack() as running:
        yield running


async def running_run(chaos: Stack, students: int, pad: int = 0) -> Run:
    run = Run(chaos, students, pad)
    await run.start()
    return run


def check(name: str, figures: Figures, note: str = "") -> None:
    record(name, figures, note)
    assert figures.lost == 0, figures
    assert figures.duplicates == 0, figures
    assert figures.reordered == 0, figures
    assert figures.delivered + figures.resynced == figures.produced, figures


@pytest.mark.timeout(300)
async def test_a_kafka_cut_during_a_500_per_second_stream(chaos: Stack) -> None:
    run = await running_run(chaos, students=50)
    try:

        async def outage() -> None:
            await asyncio.sleep(3)
            await chaos.proxy.cut()
            await asyncio.sleep(KAFKA_CUT_SECONDS)
            await chaos.proxy.restore()

        # Concurrent: while Kafka is unreachable the producer's sends block, as a backend's
        # would; the stream resumes (catching up on its schedule) once Kafka is back.
        cut = asyncio.create_task(outage())
        await run.stream(KAFKA_CUT_SECONDS + 6, rate=500)
        await cut
        figures = await run.settle(180)
    finally:
        await run.close()
    check(f"(a) Kafka cut {KAFKA_CUT_SECONDS:.0f} s at 500 ev/s", figures, "TCP proxy cut")


async def test_b_redis_restart(chaos: Stack) -> None:
    run = await running_run(chaos, students=50)
    try:
        await run.stream(3, rate=200)
        chaos.restart_redis()
        await run.stream(5, rate=200)
        figures = await run.settle()
    finally:
        await run.close()
    check("(b) Redis restart, history lost", figures, f"{figures.resync_frames} resync frames")


AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")


async def test_h_clean_restart_of_an_aof_always_redis() -> None:
    """Nothing was lost, so nothing may be said: 0 resyncs."""
    async with stack(redis_args=AOF_ALWAYS) as running:
        run = await running_run(running, students=50)
        try:
            await run.stream(3, rate=200)
            running.restart_redis()
            await run.stream(5, rate=200)
            figures = await run.settle()
        finally:
            await run.close()
    check("(h) clean restart, AOF always", figures, f"{figures.resync_frames} resync frames")
    assert figures.resync_frames == 0


async def test_i_failover_to_a_replica_that_missed_the_last_writes() -> None:
    """The replica is promoted while the primary still takes writes for half a second:
    those events reached devices and are gone. Every device is told, exactly once."""
    async with stack(redis_args=AOF_ALWAYS, replica=True) as running:
        run = await running_run(running, students=50)
        try:
            await run.stream(3, rate=200)
            failover = asyncio.create_task(running.fail_over(lag=0.5))
            await run.stream(5, rate=200)
            await failover
            figures = await run.settle()
        finally:
            await run.close()
    resyncs = sorted({sum(kind == "r" for kind, _ in d.items) for d in run.devices})
    check("(i) failover to a lagging replica", figures, f"resyncs per device: {resyncs}")
    assert resyncs == [1]


async def test_c_kill_9_of_one_of_two_gateways(chaos: Stack) -> None:
    run = await running_run(chaos, students=100)
    try:
        await run.stream(3, rate=300)
        chaos.kill_gateway(0)
        await run.stream(5, rate=300)
        await run.wait_connected(60)
        figures = await run.settle()
    finally:
        await run.close()
    moved = sum(d.connects > 1 for d in run.devices)
    check("(c) kill -9 of one gateway", figures, f"{moved} devices resumed on the other")


@pytest.mark.timeout(300)
async def test_d_1000_clients_reconnecting_at_once(chaos: Stack) -> None:
    run = await running_run(chaos, students=1000)
    try:
        await run.stream(2, rate=500)
        for index in (0, 1):
            chaos.kill_gateway(index, signal.SIGTERM)
        for index in (0, 1):
            chaos.start_gateway(index)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await run.stream(5, rate=500)
        await run.wait_connected(120)
        back = loop.time() - started
        figures = await run.settle()
    finally:
        await run.close()
    check("(d) 1,000 clients reconnect at once", figures, f"all back within {back:.1f} s")


async def test_e_one_slow_client_among_fast_ones(chaos: Stack) -> None:
    run = await running_run(chaos, students=10, pad=8192)
    slow = run.devices[0]
    try:
        await run.stream(1, rate=200)
        slow.reading.clear()
        await run.stream(10, rate=1000)
        slow.reading.set()
        figures = await run.settle()
    finally:
        await run.close()
    fast = sorted(x for d in run.devices[1:] for x in d.latencies)
    p99 = fast[int(len(fast) * 0.99) - 1]
    closes = {code: n for code, n in slow.closes.items() if code}
    check(
        "(e) one slow client among fast ones",
        figures,
        f"slow closed {closes}; fast p99 {p99:.0f} ms",
    )
    assert slow.connects > 1


async def test_f_kill_9_of_the_bridge_and_restart(chaos: Stack) -> None:
    run = await running_run(chaos, students=50)
    try:
        await run.stream(3, rate=300)
        chaos.kill_bridge()
        await run.stream(4, rate=300)
        chaos.start_bridge()
        await run.stream(3, rate=300)
        figures = await run.settle()
    finally:
        await run.close()
    check("(f) kill -9 of the bridge, restart", figures)


async def test_g_pubsub_connection_killed(chaos: Stack) -> None:
    redis = Redis.from_url(chaos.redis.address)
    run = await running_run(chaos, students=50)
    kills = 0
    try:
        streaming = asyncio.create_task(run.stream(6, rate=300))
        for _ in range(4):
            await asyncio.sleep(1.2)
            kills += await redis.client_kill_filter(_type="pubsub")
        await streaming
        figures = await run.settle()
    finally:
        await run.close()
        await redis.aclose()
    check("(g) CLIENT KILL TYPE pubsub", figures, f"{kills} Pub/Sub connections killed")


async def bridge_consumed(running: Stack) -> int:
    """Messages of the chaos topic the bridge process has read (its /metrics)."""
    url = f"http://127.0.0.1:{running.env['BRIDGE_PORT']}/metrics"
    async with httpx.AsyncClient() as http:
        text = (await http.get(url)).text
    prefix = f'notify_bridge_events_consumed_total{{topic="{TOPIC}"}} '
    line = next((line for line in text.splitlines() if line.startswith(prefix)), None)
    return 0 if line is None else int(float(line.removeprefix(prefix)))


async def until(
    check: Callable[[], Awaitable[bool]],
    within: float,
    what: str,
    explain: Callable[[], Awaitable[str]] | None = None,
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() >= deadline:
            why = "" if explain is None else f": {await explain()}"
            raise AssertionError(f"timed out: {what}{why}")
        await asyncio.sleep(0.5)


async def outbox_settled(run: OutboxRun, within: float = 120) -> tuple[Figures, str]:
    """Every committed event forwarded and the bridge's copies read; the figures, and a note
    on what Kafka holds."""
    committed = sum(run.sent.values())

    async def forwarded_all() -> bool:
        return (await run.forwarded())[0] == committed

    await until(forwarded_all, within, "every committed event in Kafka", run.whereabouts)
    distinct, duplicates, reordered = await run.forwarded()

    async def bridge_read_all() -> bool:
        return await bridge_consumed(run.stack) >= distinct + duplicates

    await until(bridge_read_all, within, "the bridge reads the forwarded events", run.whereabouts)
    figures = await run.settle(within)
    assert reordered == 0, f"{reordered} events reached Kafka out of order"
    return figures, f"Kafka: {distinct} events, {duplicates} duplicates, {reordered} out of order"


@pytest.mark.timeout(400)
async def test_j_kafka_down_while_the_payment_service_commits_through_the_outbox() -> None:
    """The first incident report, replayed: the payment service's emit to Kafka failed
    (ECONNREFUSED) and the purchase event was gone. Written to the outbox in its own
    transaction instead, every committed one reaches its student during the cut."""
    async with stack(outbox=True) as running:
        running.start_relays(2)
        run = OutboxRun(running, students=100)
        await run.start()
        try:
            await running.proxy.cut()
            await run.stream(KAFKA_CUT_SECONDS, rate=5000 / KAFKA_CUT_SECONDS)  # 5,000 purchases
            during = await run.settle(60)
            check("(j) outbox, Kafka down: notified during the cut", during)
            await running.proxy.restore()
            figures, kafka = await outbox_settled(run)
        finally:
            await run.close()
    check(
        "(j) outbox, Kafka down: after the cut",
        figures,
        f"{run.rolled_back} rolled back, none notified; {kafka}; the bridge notified none again",
    )


async def test_k_kill_9_of_one_of_two_relays() -> None:
    async with stack(outbox=True) as running:
        running.start_relays(2)
        run = OutboxRun(running, students=50)
        await run.start()
        try:
            streaming = asyncio.create_task(run.stream(6, rate=400))
            await asyncio.sleep(2)
            running.kill_relay(0)
            await streaming
            figures, kafka = await outbox_settled(run)
        finally:
            await run.close()
    check("(k) outbox, kill -9 of one of two relays", figures, kafka)


async def test_l_postgresql_restart_under_the_outbox() -> None:
    async with stack(outbox=True) as running:
        running.start_relays(2)
        run = OutboxRun(running, students=50)
        await run.start()
        try:
            streaming = asyncio.create_task(run.stream(6, rate=300))
            await asyncio.sleep(2)
            running.restart_postgres()
            await streaming
            figures, kafka = await outbox_settled(run)
        finally:
            await run.close()
    check("(l) outbox, PostgreSQL restart", figures, kafka)
