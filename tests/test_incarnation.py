"""History incarnations across Redis restarts and failovers (notify.incarnation).

A restart that lost nothing must be invisible to clients; one that may have lost events,
and a failover to a replica that missed the last writes, must end the incarnation with
exactly one resync per device, never a silent gap and never a resync on every reconnect.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from notify import embedded, redis_client
from notify.incarnation import Durability
from notify.redis_client import Client

from .support import (
    TcpProxy,
    events,
    nothing_arrives,
    open_client,
    publisher,
    recv_json,
    start_gateway,
)
from .test_delivery import numbers, publish_numbered

AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
AOF_EVERYSEC = ("--appendonly", "yes", "--appendfsync", "everysec")


@pytest.fixture
def servers() -> Iterator[list[embedded.Server]]:
    """Servers a test starts, and restarts; whichever are left are stopped."""
    started: list[embedded.Server] = []
    yield started
    for server in started:
        server.stop()


async def until_replicated(redis: Client) -> None:
    """Until the replica acknowledged every write so far (it may still be syncing)."""
    for _ in range(60):
        # Under the client's 5 s socket timeout, whatever the replica's state.
        if await redis.wait(1, 1000) == 1:
            return
    raise AssertionError("the replica never caught up")


def epoch(event_id: str) -> str:
    return event_id.split("-")[0]


async def test_a_clean_restart_of_an_aof_always_redis_resyncs_no_one(
    servers: list[embedded.Server], tmp_path: Path, student: str
) -> None:
    servers.append(embedded.start_redis(args=AOF_ALWAYS, workdir=str(tmp_path)))
    server = servers[0]
    redis = redis_client.client(server.address)
    pub = publisher(redis)
    try:
        async with start_gateway(server.address) as gateway:
            ws, _ = await open_client(gateway.ws_url(student))
            before = await publish_numbered(pub, student, range(3))
            assert numbers(await events(ws, 3)) == [0, 1, 2]

            server.stop()  # SIGTERM: a clean shutdown
            servers[0] = server = embedded.start_redis(server.port, AOF_ALWAYS, str(tmp_path))
            # The gateway's Pub/Sub reconnects and catches the connection up: nothing was
            # lost, so nothing is said; the events after the restart follow in order.
            after = await publish_numbered(pub, student, range(3, 5))
            assert epoch(after[0]) == epoch(before[0])
            frames = await events(ws, 2, timeout=15)
            assert [f["type"] for f in frames] == ["event", "event"]
            assert numbers(frames) == [3, 4]
            # A device that was away resumes exactly, and again after that.
            for since in (before[0], after[-1]):
                other, welcome = await open_client(gateway.ws_url(student, since=since))
                assert welcome["recovered"] is True
                await other.close()
            await ws.close()
    finally:
        await redis.aclose()


async def test_a_restart_that_may_have_lost_writes_resyncs_each_device_once(
    servers: list[embedded.Server], tmp_path: Path, student: str
) -> None:
    """AOF with ``appendfsync everysec``: a crash loses up to a second that clients may
    have seen, and the node cannot tell a crash from a clean stop."""
    servers.append(embedded.start_redis(args=AOF_EVERYSEC, workdir=str(tmp_path)))
    server = servers[0]
    redis = redis_client.client(server.address)
    pub = publisher(redis)
    try:
        async with start_gateway(server.address) as gateway:
            ws, _ = await open_client(gateway.ws_url(student))
            before = await publish_numbered(pub, student, range(3))
            assert numbers(await events(ws, 3)) == [0, 1, 2]

            server.stop()
            servers[0] = server = embedded.start_redis(server.port, AOF_EVERYSEC, str(tmp_path))
            resync = await recv_json(ws, timeout=15)
            assert resync["type"] == "resync"
            assert resync["reason"] == "history epoch changed"
            position = resync["last_id"]
            assert epoch(position) != epoch(before[0])
            assert position.endswith("-0")
            [after] = await publish_numbered(pub, student, range(3, 4))
            assert after == epoch(position) + "-1"
            assert numbers(await events(ws, 1)) == [3]
            await ws.close()
            # The position the resync handed out resumes exactly: no resync loop.
            ws, welcome = await open_client(gateway.ws_url(student, since=position))
            assert welcome["recovered"] is True
            assert numbers(await events(ws, 1)) == [3]
            await ws.close()
    finally:
        await redis.aclose()


async def test_a_failover_to_a_replica_that_missed_the_last_writes_resyncs_each_device_once(
    servers: list[embedded.Server], tmp_path: Path, student: str
) -> None:
    """Both nodes persist every write (AOF always), so only the failover rule can tell."""
    for node in ("primary", "replica"):
        (tmp_path / node).mkdir()
    primary = embedded.start_redis(args=AOF_ALWAYS, workdir=str(tmp_path / "primary"))
    servers.append(primary)
    replica_args = (*AOF_ALWAYS, "--replicaof", "127.0.0.1", str(primary.port))
    replica = embedded.start_redis(args=replica_args, workdir=str(tmp_path / "replica"))
    servers.append(replica)
    # What clients reach: the primary, until the failover points it at the replica.
    proxy = TcpProxy(embedded.free_port(), primary.port)
    await proxy.start()
    address = f"redis://127.0.0.1:{proxy.port}/0"
    redis = redis_client.client(address)
    pub = publisher(redis)
    try:
        async with start_gateway(address) as gateway:
            ws, _ = await open_client(gateway.ws_url(student))
            replicated = await publish_numbered(pub, student, range(3))
            await until_replicated(redis)
            # The replica is promoted now; the primary goes on taking writes it never sees.
            async with Redis(port=replica.port) as promoted:
                await promoted.replicaof("NO", "ONE")
            lost = await publish_numbered(pub, student, range(3, 5))
            assert numbers(await events(ws, 5)) == [0, 1, 2, 3, 4]

            proxy.upstream = replica.port
            await proxy.cut()
            primary.stop()
            await proxy.restore()
            # The connected device: told once, at the catch-up after the failover.
            resync = await recv_json(ws, timeout=15)
            assert resync["type"] == "resync"
            assert resync["reason"] == "history epoch changed"
            assert epoch(resync["last_id"]) != epoch(replicated[0])
            [new] = await publish_numbered(pub, student, range(5, 6))
            assert numbers(await events(ws, 1)) == [5]
            # Devices that were away, having seen the lost events or not: once each too.
            for since in (lost[-1], replicated[-1]):
                away, welcome = await open_client(gateway.ws_url(student, since=since))
                assert welcome["recovered"] is False
                assert await recv_json(away) == {
                    "type": "resync",
                    "reason": "history epoch changed",
                    "last_id": new,
                }
                await away.close()
                away, welcome = await open_client(gateway.ws_url(student, since=new))
                assert welcome["recovered"] is True
                await nothing_arrives(away)
                await away.close()
            await ws.close()
    finally:
        await redis.aclose()
        await proxy.cut()


async def test_a_redis_that_refuses_config_counts_as_not_durable(
    servers: list[embedded.Server],
) -> None:
    """Managed services often disable CONFIG: restarts then resync, never go silent."""
    servers.append(embedded.start_redis(args=(*AOF_ALWAYS, "--rename-command", "CONFIG", "")))
    redis = redis_client.client(servers[0].address)
    try:
        assert await Durability(redis).flag() == "0"
    finally:
        await redis.aclose()
    servers.append(embedded.start_redis(args=AOF_ALWAYS))
    redis = redis_client.client(servers[1].address)
    try:
        assert await Durability(redis).flag() == "1"
    finally:
        await redis.aclose()
