"""Real servers for the suite: valkey-server and tansu on free loopback ports.

``REDIS_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` point the suite at external servers instead
(for example this machine's Redis 7). Tests isolate themselves with unique student ids,
topics and consumer groups, so they never need to flush a shared server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from notify import embedded

from .support import GatewayServer, start_gateway

# The services the tests start as processes import this checkout, as the suite itself does
# (pytest's ``pythonpath``), whether the project is installed editable, as a wheel or not
# at all.
ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = embedded.start_redis()
    yield server.address
    server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    server = embedded.start_kafka()
    yield server.address
    server.stop()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """PostgreSQL for the outbox: the embedded server, or NOTIFY_OUTBOX_DSN's."""
    external = os.environ.get("NOTIFY_OUTBOX_DSN")
    if external:
        yield external
        return
    server = embedded.start_postgres()
    yield server.address
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[embedded.Cluster]:
    """Three masters with one replica each, in cluster mode: for REDIS_CLUSTER=1 tests."""
    cluster = embedded.start_redis_cluster(masters=3, replicas=1)
    yield cluster
    cluster.stop()


@pytest.fixture
def private_redis() -> Iterator[embedded.Server]:
    """A valkey-server of this test's own, for FLUSHALL, restarts and CLIENT KILL."""
    server = embedded.start_redis()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def student() -> str:
    return f"student-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[GatewayServer]:
    async with start_gateway(redis_url) as server:
        yield server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The chaos and security figures, as a table (and reports/chaos.md, not committed)."""
    from .chaos import report

    if report.ROWS:
        terminalreporter.write_sep("=", "chaos and security figures")
        terminalreporter.write_line(report.write())
