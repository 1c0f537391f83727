"""``notify gateway --processes 2``: two processes on one port; one is killed, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from notify import embedded, processes, redis_client
from notify.publish import Notification

from .support import (
    publisher,
    recv_json,
    settings_env,
    token,
    unique,
    wait_ready,
)


class Student:
    """A device that reconnects with ``since`` whenever its connection drops, like the app."""

    def __init__(self, port: int) -> None:
        self.user = unique("proc")
        self._port = port
        self.ids: list[str] = []
        self.reconnects = 0
        self.welcomed = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        position: str | None = None
        while True:
            url = f"ws://127.0.0.1:{self._port}/ws?token={token(self.user)}"
            if position is not None:
                url += f"&since={position}"
            with contextlib.suppress(OSError, ConnectionClosed, InvalidStatus, TimeoutError):
                async with connect(url, open_timeout=5) as ws:
                    while True:
                        frame = await recv_json(ws, timeout=3600)
                        if frame["type"] == "welcome" and position is None:
                            position = frame["last_id"]
                            self.welcomed = True
                        elif frame["type"] == "event":
                            self.ids.append(frame["id"])
                            position = frame["id"]
            self.reconnects += 1
            await asyncio.sleep(0.1)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


async def wait_for(condition: Callable[[], bool], within: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """A Redis of this test's own, or (REDIS_CLUSTER=1) the suite's three-master cluster."""
    if request.param == "cluster":
        cluster: embedded.Cluster = request.getfixturevalue("redis_cluster")
        return cluster.address, True
    server: embedded.Server = request.getfixturevalue("private_redis")
    return server.address, False


async def test_two_processes_share_the_port_and_a_killed_one_loses_nothing(
    backend: tuple[str, bool],
) -> None:
    address, cluster = backend
    port = embedded.free_port()
    env = {**os.environ, **settings_env(address, PORT=str(port))}
    env["NOTIFY_LOG_LEVEL"] = "WARNING"
    env["REDIS_CLUSTER"] = "1" if cluster else "0"
    command = processes.notify("gateway", "--processes", "2")
    redis = redis_client.client(address, cluster)

    async def heartbeats() -> set[bytes | str]:
        # KEYS asks one node of a cluster unless told to ask every primary.
        extra = {"target_nodes": RedisCluster.PRIMARIES} if cluster else {}
        return set(await redis.keys("notify:process:*", **extra))

    # Heartbeat keys of earlier tests' processes may still be there on the shared cluster.
    before = await heartbeats()
    supervisor = processes.spawn(command, env, quiet=True)
    pub = publisher(redis)
    students: list[Student] = []
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}")
        # Both processes up: each keeps a heartbeat key.
        await wait_for(lambda: len(children(supervisor.pid)) == 2)
        for _ in range(400):
            if len(await heartbeats() - before) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(await heartbeats() - before) >= 2, "both processes keep a heartbeat"
        students = [Student(port) for _ in range(30)]

        async def serving_processes() -> set[bytes | str]:
            fields: set[bytes | str] = set()
            for student in students:
                fields |= set(await redis.hkeys(f"{{u:{student.user}}}:presence"))
            return fields

        # The kernel spread the connections over both processes.
        for _ in range(200):
            if len(await serving_processes()) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(await serving_processes()) == 2

        async def publish(count: int) -> None:
            for student in students:
                for _ in range(count):
                    await pub.publish(Notification(student.user, "E"))

        # A device without a position starts at the head its welcome names: an event
        # published before that is history it never asked for, not a lost one.
        await wait_for(lambda: all(s.welcomed for s in students))
        await publish(3)
        await wait_for(lambda: all(len(s.ids) == 3 for s in students))
        killed = children(supervisor.pid)[0]
        os.kill(killed, signal.SIGKILL)
        await publish(3)
        # Its clients reconnected (to the survivor, or the restarted process) and resumed.
        await wait_for(lambda: all(len(s.ids) >= 6 for s in students))
        await asyncio.sleep(0.5)
        for student in students:
            expected = [f"{student.ids[0].rsplit('-', 1)[0]}-{n}" for n in range(1, 7)]
            assert student.ids == expected  # every event once, in order
        assert any(s.reconnects for s in students)
        # The supervisor replaced the killed process.
        await wait_for(lambda: len(children(supervisor.pid)) == 2)
        assert killed not in children(supervisor.pid)
    finally:
        for student in students:
            student.task.cancel()
        await redis.aclose()
        supervisor.terminate()
        supervisor.wait(15)
    assert supervisor.returncode == 0
