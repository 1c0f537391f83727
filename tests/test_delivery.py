"""The delivery promise: every event once and in order, or an explicit resync.

Each test counts every event by the sequence number it carries in its data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from notify import config, embedded, library, processes, redis_client
from notify.config import load_history
from notify.keys import Keys
from notify.publish import Notification, Publisher

from .support import (
    API_KEY,
    KEYS,
    GatewayServer,
    events,
    nothing_arrives,
    open_client,
    publisher,
    recv_json,
    settings_env,
    start_gateway,
    token,
)


async def publish_numbered(pub: Publisher, user: str, numbers: range, **data: Any) -> list[str]:
    return [str((await pub.publish(Notification(user, "E", {"n": n, **data}))).id) for n in numbers]


def numbers(frames: list[dict[str, Any]]) -> list[int]:
    return [f["data"]["n"] for f in frames if f["type"] == "event"]


async def test_resume_delivers_all_200_missed_events_in_order(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    pub = publisher(redis, size=500)
    ws, _ = await open_client(gateway.ws_url(student))
    await publish_numbered(pub, student, range(1))
    [first] = await events(ws, 1)
    await ws.close()

    await publish_numbered(pub, student, range(1, 201))
    ws, welcome = await open_client(gateway.ws_url(student, since=first["id"]))
    assert welcome["recovered"] is True
    replayed = await events(ws, 200)
    assert numbers(replayed) == list(range(1, 201))
    assert welcome["last_id"] == replayed[-1]["id"]
    await publish_numbered(pub, student, range(201, 202))
    assert numbers(await events(ws, 1)) == [201]
    await nothing_arrives(ws)
    await ws.close()


async def test_resume_racing_live_publishes_loses_and_repeats_nothing(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """Reconnect again and again while events are published at about 1,000/s."""
    pub = publisher(redis, size=10_000)
    total = 3000
    received: list[int] = []

    async def produce() -> None:
        for n in range(total):
            await pub.publish(Notification(student, "E", {"n": n}))
            if n % 10 == 9:
                await asyncio.sleep(0.01)

    ws, welcome = await open_client(gateway.ws_url(student))
    producer = asyncio.create_task(produce())
    since: str | None = None
    reconnects = 0
    while len(received) < total:
        if reconnects:
            ws, welcome = await open_client(gateway.ws_url(student, since=since))
            assert welcome["recovered"] is True, welcome
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.2
        while len(received) < total and loop.time() < until:
            try:
                frame = await recv_json(ws, timeout=max(0.01, until - loop.time()))
            except TimeoutError:
                break
            assert frame["type"] == "event", frame
            received.append(frame["data"]["n"])
            since = frame["id"]
        await ws.close()
        reconnects += 1
    await producer
    assert reconnects > 5
    assert received == list(range(total))


async def test_trimmed_history_means_resync(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    pub = publisher(redis, size=5)
    [old] = await publish_numbered(pub, student, range(1))
    # The history is trimmed to its size once twice over it: it keeps at least the last 5.
    newer = await publish_numbered(pub, student, range(1, 251))
    ws, welcome = await open_client(gateway.ws_url(student, since=old))
    assert welcome["recovered"] is False
    resync = await recv_json(ws)
    assert resync == {"type": "resync", "reason": "history trimmed", "last_id": newer[-1]}
    await publish_numbered(pub, student, range(251, 252))
    assert numbers(await events(ws, 1)) == [251]
    await ws.close()


async def test_a_student_listed_twice_in_one_call_gets_one_incarnation_and_no_holes(
    redis: Redis, student: str
) -> None:
    """The publish function reads each student's incarnation once per call. A caller that
    lists a student in two places of one call (the Publisher groups a student's
    notifications, a hand-written caller may not) must still get consecutive ids in one
    epoch, also across the trims and the first event that each rewrite the incarnation."""
    await library.load(redis)
    ids: list[str] = []
    for first in range(0, 30, 3):
        keys: list[str] = [KEYS.dedupe(student, f"call:{first}")]
        args: list[Any] = ["e0000001", "0", 5, 3600, 3600, 3600, 0]  # history size 5
        for n in range(first, first + 3):
            keys += [KEYS.incarnation(student), KEYS.history(student)]
            body = b'"event":"E","data":{"n":%d},"invalidate":[],"ts":0}' % n
            args += [KEYS.channel(student), body, ""]
        reply = await library.call(redis, library.PUBLISH, keys, args)
        replies = [r.decode() if isinstance(r, bytes) else r for r in reply]
        assert replies[1::2] == ["1"] * 3, replies
        ids += replies[0::2]
    assert len({i.split("-")[0] for i in ids}) == 1, ids
    assert [int(i.split("-")[1]) for i in ids] == list(range(1, 31)), ids


async def test_expired_history_means_resync(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    [old] = (await publish_numbered(publisher(redis), student, range(3)))[-1:]
    # What NOTIFY_HISTORY_TTL does after a day of silence, without waiting a day.
    await redis.pexpire(KEYS.incarnation(student), 1)
    await redis.pexpire(KEYS.history(student), 1)
    await asyncio.sleep(0.05)
    ws, welcome = await open_client(gateway.ws_url(student, since=old))
    assert welcome["recovered"] is False
    assert (await recv_json(ws))["reason"] == "history expired"
    await ws.close()


@pytest.mark.parametrize(
    ("since", "reason"),
    [
        ("garbage", "malformed id"),
        ("zzzz-1", "history epoch changed"),
        ("{epoch}-99", "unknown id"),
    ],
)
async def test_ids_the_history_cannot_honour_mean_resync(
    gateway: GatewayServer, redis: Redis, student: str, since: str, reason: str
) -> None:
    [last] = (await publish_numbered(publisher(redis), student, range(2)))[-1:]
    ws, welcome = await open_client(
        gateway.ws_url(student, since=since.format(epoch=last.split("-")[0]))
    )
    assert welcome["recovered"] is False
    assert welcome["last_id"] == last
    assert await recv_json(ws) == {"type": "resync", "reason": reason, "last_id": last}
    await ws.close()


async def lrange_calls(redis: Redis) -> int:
    """LRANGEs Redis ran so far, those of functions included: each reads history bodies."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_lrange", {}).get("calls", 0))


async def test_a_resume_from_another_epoch_reads_no_history_body(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """The epoch is compared before the bodies are read: a resume that ends in a resync
    costs Redis no read of the history, however long it is."""
    ids = await publish_numbered(publisher(redis, size=500), student, range(300), pad="x" * 200)
    before = await lrange_calls(redis)
    ws, welcome = await open_client(gateway.ws_url(student, since="zzzz-1"))
    assert welcome["recovered"] is False
    assert (await recv_json(ws))["reason"] == "history epoch changed"
    await ws.close()
    assert await lrange_calls(redis) == before
    # The same resume from this epoch reads them: the count does see the function's reads.
    ws, welcome = await open_client(gateway.ws_url(student, since=ids[0]))
    assert numbers(await events(ws, 299)) == list(range(1, 300))
    await ws.close()
    assert await lrange_calls(redis) > before


async def test_missed_events_larger_than_the_send_budget_are_a_resync(
    redis_url: str, redis: Redis, student: str
) -> None:
    """A replay counts against the connection's send budget: one that cannot fit is a
    resync ("too far behind"), not a connection closed on every resume. Live events follow."""
    pub = publisher(redis, size=500)
    async with start_gateway(redis_url, NOTIFY_SEND_QUEUE_BYTES="8192") as gateway:
        [first, *_, last] = await publish_numbered(pub, student, range(100), pad="x" * 200)
        ws, welcome = await open_client(gateway.ws_url(student, since=first))
        assert welcome["recovered"] is False
        assert await recv_json(ws) == {
            "type": "resync",
            "reason": "too far behind",
            "last_id": last,
        }
        await publish_numbered(pub, student, range(100, 101))
        assert numbers(await events(ws, 1)) == [100]
        await nothing_arrives(ws)
        await ws.close()
        # Few enough to fit: replayed.
        ws, welcome = await open_client(gateway.ws_url(student, since=last))
        assert welcome["recovered"] is True
        assert numbers(await events(ws, 1)) == [100]
        await ws.close()


async def test_flushall_is_detected_by_the_epoch(
    private_redis: embedded.Server, student: str
) -> None:
    redis = redis_client.client(private_redis.address)
    pub = publisher(redis)
    async with start_gateway(private_redis.address) as gateway:
        ids = await publish_numbered(pub, student, range(3))
        await redis.flushall()
        new = await publish_numbered(pub, student, range(3, 4))
        assert new[0].split("-")[0] != ids[0].split("-")[0]
        ws, welcome = await open_client(gateway.ws_url(student, since=ids[-1]))
        assert welcome["recovered"] is False
        resync = await recv_json(ws)
        assert resync == {"type": "resync", "reason": "history epoch changed", "last_id": new[0]}
        await ws.close()
    await redis.aclose()


async def test_a_history_from_another_node_reaches_connected_clients_as_a_resync(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """What a failover looks like to a connected client, on one node.

    A promoted replica serves the history under another replication id and may lack its
    newest events; the next publish starts a new epoch. Its first event (seq 1) must not be
    taken as simply the next one: the client gets a resync.
    """
    pub = publisher(redis)
    ws, _ = await open_client(gateway.ws_url(student))
    old = await publish_numbered(pub, student, range(3))
    assert numbers(await events(ws, 3)) == [0, 1, 2]
    # Written on another node: the incarnation key starts with the writer's replication id.
    await redis.eval(
        "redis.call('SET', KEYS[1], string.rep('0', 40) .. redis.call('GET', KEYS[1]):sub(41),"
        " 'KEEPTTL')",
        1,
        KEYS.incarnation(student),
    )
    # A client resuming now is told at once, before any new event.
    other, welcome = await open_client(gateway.ws_url(student, since=old[-1]))
    assert welcome["recovered"] is False
    assert (await recv_json(other))["reason"] == "history epoch changed"
    await other.close()
    [new] = await publish_numbered(pub, student, range(3, 4))
    assert new.split("-")[0] != old[0].split("-")[0]
    assert new.endswith("-1")
    assert await recv_json(ws) == {
        "type": "resync",
        "reason": "history epoch changed",
        "last_id": new,
    }
    await publish_numbered(pub, student, range(4, 5))
    assert numbers(await events(ws, 1)) == [4]
    await ws.close()


async def test_redis_restart_resyncs_connected_clients(
    private_redis: embedded.Server, student: str
) -> None:
    async with start_gateway(private_redis.address) as gateway:
        redis = redis_client.client(private_redis.address)
        ws, _ = await open_client(gateway.ws_url(student))
        await publish_numbered(publisher(redis), student, range(3))
        assert numbers(await events(ws, 3)) == [0, 1, 2]

        private_redis.stop()
        restarted = embedded.start_redis(private_redis.port)
        try:
            # The gateway reconnects, finds the history gone, and says so.
            resync = await recv_json(ws, timeout=15)
            assert resync["type"] == "resync"
            assert resync["reason"] == "history expired"
            await publish_numbered(publisher(redis), student, range(3, 5))
            assert numbers(await events(ws, 2)) == [3, 4]
        finally:
            await ws.close()
            await redis.aclose()
            restarted.stop()


async def test_pubsub_connection_killed_mid_stream_loses_nothing(
    private_redis: embedded.Server, student: str
) -> None:
    redis = redis_client.client(private_redis.address)
    pub = publisher(redis, size=5000)
    total = 2000
    async with start_gateway(private_redis.address) as gateway:
        ws, _ = await open_client(gateway.ws_url(student))

        async def produce() -> None:
            for n in range(total):
                await pub.publish(Notification(student, "E", {"n": n}))
                if n % 20 == 19:
                    await asyncio.sleep(0.01)

        producer = asyncio.create_task(produce())
        kills = 0
        for _ in range(3):
            await asyncio.sleep(0.3)
            kills += await redis.client_kill_filter(_type="pubsub")
        await producer
        frames = await events(ws, total, timeout=30)
        assert kills >= 3
        assert numbers(frames) == list(range(total))
        await nothing_arrives(ws)
        await ws.close()
    await redis.aclose()


async def test_slow_client_is_closed_and_resumes_without_delaying_a_fast_one(
    redis_url: str, redis: Redis, student: str
) -> None:
    total = 1200
    pub = publisher(redis, size=total)
    fast_student = student + "-fast"
    async with start_gateway(redis_url, NOTIFY_SEND_QUEUE_BYTES=str(64 * 1024)) as gateway:
        # A phone that stops reading; 1,200 x 16 KiB outgrows every buffer on the way.
        slow = await connect(gateway.ws_url(student), max_queue=1)
        fast, _ = await open_client(gateway.ws_url(fast_student))
        latencies: list[float] = []
        fast_numbers: list[int] = []

        async def read_fast() -> None:
            while len(fast_numbers) < 300:
                frame = await recv_json(fast, timeout=30)
                latencies.append(time.time() * 1000 - frame["ts"])
                fast_numbers.append(frame["data"]["n"])

        reader = asyncio.create_task(read_fast())
        big = "x" * 16_384
        for n in range(total):
            await pub.publish(Notification(student, "E", {"n": n, "pad": big}))
            if n % 4 == 0:
                await pub.publish(Notification(fast_student, "E", {"n": n // 4}))
        await reader
        assert fast_numbers == list(range(300))
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        p50, worst = latencies[len(latencies) // 2], latencies[-1]
        print(f"fast client beside a slow one: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"max {worst:.1f} ms over {len(latencies)} events")  # fmt: skip
        assert p99 < 500, f"fast client p99 {p99:.0f} ms"

        # Now the slow phone reads what reached it, then learns it was dropped.
        got, code = await read_until_closed(slow)
        assert code == 4008
        received = numbers(got)
        assert received == list(range(len(received)))
        assert len(received) < total
        # The rest, ~17 MB, cannot fit into this gateway's 64 KiB queue: a replay would
        # close the client again, so it is told to reload its stores instead.
        since = got[-1]["id"]
        ws, welcome = await open_client(gateway.ws_url(student, since=since))
        assert welcome["recovered"] is False
        assert (await recv_json(ws))["reason"] == "too far behind"
        for client in (ws, fast):
            await client.close()
    # Where the queue can hold it, resuming from what it processed brings exactly the rest.
    async with start_gateway(redis_url, NOTIFY_SEND_QUEUE_BYTES=str(64 << 20)) as roomy:
        ws, welcome = await open_client(roomy.ws_url(student, since=since))
        assert welcome["recovered"] is True
        rest = numbers(await events(ws, total - len(received), timeout=30))
        assert received + rest == list(range(total))
        await ws.close()


async def read_until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(await recv_json(ws, timeout=30))
    except ConnectionClosed as closed:
        return frames, None if closed.rcvd is None else closed.rcvd.code


async def test_expired_token_closes_then_resume_loses_nothing(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    pub = publisher(redis)
    url = gateway.ws_url() + f"?token={token(student, ttl=2)}"
    ws, _ = await open_client(url)
    ids = await publish_numbered(pub, student, range(2))
    assert numbers(await events(ws, 2)) == [0, 1]
    assert await read_until_closed(ws) == ([], 4001)
    await publish_numbered(pub, student, range(2, 5))
    ws, welcome = await open_client(gateway.ws_url(student, since=ids[-1]))
    assert welcome["recovered"] is True
    assert numbers(await events(ws, 3)) == [2, 3, 4]
    await ws.close()


async def presence(url: str, user: str) -> int:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get(
            f"/api/presence/{user}", headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == user
    count: int = body["connections"]
    return count


async def eventually(check: Any, expected: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (value := await check()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, expected {expected!r}"
        await asyncio.sleep(0.1)


async def test_presence_counts_devices_across_processes_and_forgets_killed_ones(
    redis_url: str, redis: Redis, student: str
) -> None:
    port = embedded.free_port()
    env = {**os.environ, **settings_env(redis_url, PORT=str(port), NOTIFY_PRESENCE_TTL="3")}
    other = processes.spawn(processes.notify("gateway"), env)
    try:
        async with start_gateway(redis_url, NOTIFY_PRESENCE_TTL="3") as gateway:
            phone, _ = await open_client(gateway.ws_url(student))
            tablet, _ = await open_client(gateway.ws_url(student))
            await eventually(lambda: presence(gateway.url, student), 2)
            laptop = await connect_retrying(f"ws://127.0.0.1:{port}/ws?token={token(student)}")
            await eventually(lambda: presence(gateway.url, student), 3)
            await tablet.close()
            await eventually(lambda: presence(gateway.url, student), 2)
            other.send_signal(signal.SIGKILL)
            other.wait()
            await eventually(lambda: presence(gateway.url, student), 1, within=10)
            for ws in (phone, laptop):
                await ws.close()
            await eventually(lambda: presence(gateway.url, student), 0)
    finally:
        processes.stop(other)


async def connect_retrying(url: str) -> ClientConnection:
    deadline = time.monotonic() + 20
    while True:
        try:
            ws, _ = await open_client(url)
            return ws
        except OSError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_presence_requires_an_api_key(gateway: GatewayServer, student: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}):
            response = await http.get(f"/api/presence/{student}", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"


async def test_connection_limits(redis_url: str, student: str) -> None:
    async with start_gateway(
        redis_url, NOTIFY_MAX_CONNECTIONS="3", NOTIFY_MAX_CONNECTIONS_PER_USER="2"
    ) as gateway:
        first, _ = await open_client(gateway.ws_url(student))
        second, _ = await open_client(gateway.ws_url(student))
        third = await connect(gateway.ws_url(student))
        assert await read_until_closed(third) == ([], 4029)
        other, _ = await open_client(gateway.ws_url(student + "-2"))
        with pytest.raises(InvalidStatus) as refused:
            await connect(gateway.ws_url(student + "-3"))
        assert refused.value.response.status_code == 503
        for ws in (first, second, other):
            await ws.close()


async def test_sigterm_closes_every_socket_with_1012_within_10_seconds(
    redis_url: str, student: str
) -> None:
    port = embedded.free_port()
    env = {**os.environ, **settings_env(redis_url, PORT=str(port))}
    gateway = processes.spawn(processes.notify("gateway"), env)
    try:
        clients = [
            await connect_retrying(f"ws://127.0.0.1:{port}/ws?token={token(student + str(i))}")
            for i in range(5)
        ]
        started = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        for ws in clients:
            assert await read_until_closed(ws) == ([], 1012)
        gateway.wait(10)
        assert time.monotonic() - started < 10
    finally:
        processes.stop(gateway)


def test_history_defaults() -> None:
    history = load_history({})
    assert (history.size, history.ttl) == (100, 86_400)


async def test_rapid_leave_and_join_keeps_the_channel_subscribed(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    for _ in range(20):
        ws, _ = await open_client(gateway.ws_url(student))
        await ws.close()
    ws, _ = await open_client(gateway.ws_url(student))
    await publish_numbered(publisher(redis), student, range(1))
    assert numbers(await events(ws, 1)) == [0]
    await ws.close()


async def test_a_cancelled_subscribe_does_not_strand_later_ones(
    gateway: GatewayServer, redis: Redis
) -> None:
    reader = gateway.gateway.reader
    channel = KEYS.channel("stranded")
    for _ in range(5):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.subscribe(channel), 0.0001)
        reader.unsubscribe(channel)
    await asyncio.wait_for(reader.subscribe(channel), 5)
    assert channel.encode() in await redis.pubsub_shardchannels()
    reader.unsubscribe(channel)


async def test_a_client_that_has_seen_nothing_resumes_every_event_published_meanwhile(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    ws, welcome = await open_client(gateway.ws_url(student))
    empty = welcome["last_id"]
    assert empty.endswith("-0")  # before the first event of the student's history
    await ws.close()
    await publish_numbered(publisher(redis), student, range(3))
    ws, welcome = await open_client(gateway.ws_url(student, since=empty))
    assert welcome["recovered"] is True
    assert numbers(await events(ws, 3)) == [0, 1, 2]
    await ws.close()


async def test_an_incarnation_lost_before_its_first_event_reached_the_client_resyncs(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """Review item 1. The position a client stores for an empty history names which
    history was empty: if that history is lost, with events the client never saw, the
    resume must say so, however many events the new one has."""
    ws, welcome = await open_client(gateway.ws_url(student))
    empty = welcome["last_id"]
    await ws.close()
    pub = publisher(redis)
    await publish_numbered(pub, student, range(3))  # never seen by the client
    # Expiry, FLUSHALL, a restart without persistence, an unreplicated failover.
    await redis.delete(KEYS.incarnation(student), KEYS.history(student))
    [new] = await publish_numbered(pub, student, range(3, 4))
    ws, welcome = await open_client(gateway.ws_url(student, since=empty))
    assert welcome["recovered"] is False
    resync = await recv_json(ws)
    assert resync == {"type": "resync", "reason": "history epoch changed", "last_id": new}
    # Stored, that position resumes without another resync.
    await ws.close()
    ws, welcome = await open_client(gateway.ws_url(student, since=new))
    assert welcome["recovered"] is True
    await nothing_arrives(ws)
    await ws.close()


async def test_a_position_without_an_epoch_resyncs(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """``0``, which clients used to store for an empty history: it cannot say which."""
    [last] = await publish_numbered(publisher(redis), student, range(1))
    ws, welcome = await open_client(gateway.ws_url(student, since="0"))
    assert welcome["recovered"] is False
    assert await recv_json(ws) == {"type": "resync", "reason": "malformed id", "last_id": last}
    await ws.close()


def server_frames(stream: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole server frame (unmasked) after the HTTP response."""
    data = stream[stream.index(b"\r\n\r\n") + 4 :]
    frames, i = [], 0
    while i + 2 <= len(data):
        length, start = data[i + 1] & 0x7F, i + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length, start = int.from_bytes(data[start : start + size], "big"), start + size
        if start + length > len(data):
            break
        frames.append((data[i] & 0x0F, data[start : start + length]))
        i = start + length
    return frames


async def test_nothing_follows_the_close_frame_of_a_client_that_stopped_reading(
    gateway: GatewayServer, redis: Redis, student: str
) -> None:
    """A client that stops reading fills the socket's queue; a shutdown (1012) then drops
    the queue, and events published after it are not written behind the close frame."""
    pub = publisher(redis, size=500)
    loop = asyncio.get_running_loop()
    host, port = gateway.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, (host, int(port)))
    await loop.sock_sendall(
        client,
        f"GET /ws?token={token(student)} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
    )
    await asyncio.sleep(0.3)
    for n in range(40):  # ~800 KB: past the kernel buffers, under the 1 MiB send queue
        await pub.publish(Notification(student, "E", {"n": n, "pad": "x" * 20_000}))
    await asyncio.sleep(0.3)
    [sock] = gateway.gateway.sessions
    sock.shutdown()
    await publish_numbered(pub, student, range(40, 45))
    stream = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10):
        stream += chunk
    client.close()
    opcodes = [opcode for opcode, _ in server_frames(stream)]
    assert opcodes[-1] == 0x8, opcodes[-5:]  # the close frame is the last one
    assert server_frames(stream)[-1][1][:2] == (1012).to_bytes(2, "big")


async def test_deployments_sharing_one_redis_through_databases_never_see_each_others_events(
    private_redis: embedded.Server, student: str
) -> None:
    """Review item 2: Pub/Sub ignores the database index. Staging on db 13 and production
    on db 14 of one Redis got each other's events for the same student id."""
    base = private_redis.address.rsplit("/", 1)[0]
    staging_url, production_url = f"{base}/13", f"{base}/14"
    production = redis_client.client(production_url)
    try:
        async with (
            start_gateway(staging_url) as staging,
            start_gateway(production_url) as live,
        ):
            staged, _ = await open_client(staging.ws_url(student))
            real, _ = await open_client(live.ws_url(student))
            namespace = config.load_redis({"REDIS_URL": production_url}).namespace
            pub = publisher(production, keys=Keys(namespace))
            await publish_numbered(pub, student, range(2))
            assert numbers(await events(real, 2)) == [0, 1]
            await nothing_arrives(staged, within=1.0)
            for ws in (staged, real):
                await ws.close()
    finally:
        await production.aclose()
