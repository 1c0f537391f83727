"""The outbox relay: rows the backend committed, to their students and to Kafka.

Two stages work on every row, each on its own, so that either keeps going while the other's
destination is down:

- **notify**: the row's envelope goes through the bridge's own rules and publish step
  (:mod:`bridge.handling`): cache keys deleted, then one notification per recipient, with
  the bridge's dedupe key (event type and id). Then the row is marked notified.
- **forward**: the envelope goes to the row's topic (:mod:`.forward`: key = the student,
  each student's rows in order, ``notify-event-id`` in a header for the backend's own
  consumers to dedupe), then the row is marked forwarded. If the row was notified already,
  the message says so (``notify-notified``) and the bridge consuming it does not notify
  again, however late.

Each stage takes a batch of lanes (:mod:`.store`), does its work, then records it in one
short transaction (also what it did before an error stopped it). A crash before that commit
leaves the rows to do: the work is done again
(at least once), which Redis deduplicates and Kafka consumers can. A row that cannot be
parsed or mapped, that Redis keeps rejecting, or that Kafka refuses for good is marked
failed with the reason and never blocks the rows behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from notify import redis_client
from notify.config import OutboxSettings

from .. import handling
from ..handling import Rejected
from ..rules import Rule
from .forward import Forwarder
from .metrics import OutboxMetrics
from .store import FORWARD, NOTIFY, Outbox, Outcome, Row, Stage

log = logging.getLogger(__name__)

# Rows per batch, lanes a batch may take of the 64 (the rest stay for other relays), and
# batches each stage runs at once: while one waits on Redis, Kafka or PostgreSQL, another
# works.
BATCH_ROWS = 1000
BATCH_LANES = 16
WORKERS = 2
# Without a LISTEN wake-up (a lost connection, a pooler that drops notifications), the
# table is polled this often.
POLL = 0.5
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
CLOSE_TIMEOUT = 15.0
STATS_INTERVAL = 5.0
EXPIRE_INTERVAL = 60.0

_DATABASE_DOWN: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # What asyncpg raises when the server went away in the middle of a transaction and
    # the rollback finds the connection in the wrong state.
    asyncpg.InternalClientError,
    OSError,
)
_RETRIED = (*_DATABASE_DOWN, *redis_client.UNAVAILABLE, KafkaError, TimeoutError)


class Relay:
    def __init__(self, settings: OutboxSettings, rule_set: Mapping[str, Rule]) -> None:
        self._settings = settings
        self._rules = rule_set
        self._outbox = Outbox(settings.outbox.table)
        self._redis, self._publisher = handling.connect(settings.redis, settings.history)
        self._pool: Any = None  # asyncpg.Pool, once PostgreSQL answered
        self._connecting = asyncio.Lock()
        self._forwarder = Forwarder(settings.kafka_bootstrap, settings.idempotent)
        self.metrics = OutboxMetrics()
        self._wake = {stage: asyncio.Event() for stage in Stage}
        # What each stage is failing at right now, or None: the readiness signal.
        self._failing: dict[Stage, str | None] = dict.fromkeys(Stage, "starting")

    @property
    def ready(self) -> bool:
        return all(failing is None for failing in self._failing.values())

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; each stage finishes the batch in hand first."""
        helpers = [asyncio.create_task(self._listen(stop)), asyncio.create_task(self._watch())]
        try:
            await asyncio.gather(
                *(self._stage(stage, stop) for stage in Stage for _ in range(WORKERS))
            )
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._close()

    async def _stage(self, stage: Stage, stop: asyncio.Event) -> None:
        backoff = BACKOFF_MIN
        while not stop.is_set():
            # Cleared before the batch: a wake-up during it means rows it may not have seen.
            self._wake[stage].clear()
            try:
                count = await self._batch(stage)
            except _RETRIED as exc:
                if self._failing[stage] in (None, "starting"):
                    log.warning("outbox %s stage failing (%r); retrying", stage.value, exc)
                self._failing[stage] = repr(exc)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if self._failing[stage] not in (None, "starting"):
                log.info("outbox %s stage recovered", stage.value)
            self._failing[stage] = None
            backoff = BACKOFF_MIN
            if count < BATCH_ROWS:
                await _wait(stop, POLL, self._wake[stage])

    async def _batch(self, stage: Stage) -> int:
        pool = await self._database()
        if stage is FORWARD:
            # Rows are read only once Kafka answers. Read while it is down, a row's notified
            # mark is whatever it was then, and the message sent at the end of the outage
            # would ask the bridge to notify again an event whose dedupe key may be gone.
            await self._forwarder.connect()
        async with pool.acquire() as conn:
            try:
                rows = await self._outbox.claim(conn, stage, BATCH_LANES, BATCH_ROWS)
                if not rows:
                    return 0
                work = self._notify if stage is NOTIFY else self._forwarder.send
                outcome = await work(rows)
                # What was done before an error is recorded: it is not done again.
                async with conn.transaction():
                    delete = self._settings.retention == 0
                    await self._outbox.done(conn, stage, outcome.done, delete)
                    await self._outbox.fail(conn, outcome.failures)
                    await self._outbox.rejected(conn, outcome.rejected)
            finally:
                if not conn.is_closed():
                    await self._outbox.release(conn)
        if outcome.done:
            # The batch's oldest row: observing each one cost a tenth of the relay's CPU.
            lag = (datetime.now(UTC) - rows[0].created_at).total_seconds()
            self.metrics.lag.labels(stage.value).observe(lag)
        self.metrics.done.labels(stage.value).inc(len(outcome.done))
        self.metrics.failed.labels(stage.value).inc(len(outcome.failures))
        for row_id, reason in outcome.failures.items():
            log.warning("outbox row %d failed at %s: %s", row_id, stage.value, reason)
        if outcome.error is not None:
            raise outcome.error
        return len(rows)

    async def _notify(self, rows: list[Row]) -> Outcome:
        """Publish the rows' notifications."""
        items = [
            handling.map_event(row, row.payload.encode(), self._rules, self.metrics) for row in rows
        ]
        for item, row in zip(items, rows, strict=True):
            item.rejected = row.attempts
        with contextlib.suppress(Rejected):  # those rows are counted and tried again
            await handling.publish(self._publisher, items, self.metrics)
        done: list[int] = []
        failures: dict[int, str] = {}
        rejected: list[int] = []
        for item, row in zip(items, rows, strict=True):
            if item.reason is not None:
                failures[row.id] = item.reason
            elif item.rejected > row.attempts:
                rejected.append(row.id)
            else:
                done.append(row.id)
        return Outcome(done, failures, rejected)

    async def _database(self) -> Any:
        async with self._connecting:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self._settings.outbox.dsn, min_size=1, max_size=4, command_timeout=30
                )
                async with pool.acquire() as conn:
                    if not await self._outbox.exists(conn):
                        await pool.close()
                        raise _missing_table(self._outbox.table)
                self._pool = pool
        return self._pool

    async def _listen(self, stop: asyncio.Event) -> None:
        """Wake both stages when a transaction that inserted rows commits (LISTEN)."""

        def woken(*_args: Any) -> None:
            for event in self._wake.values():
                event.set()

        backoff = BACKOFF_MIN
        while not stop.is_set():
            conn = None
            try:
                conn = await asyncpg.connect(self._settings.outbox.dsn)
                closed = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, closed))
                await conn.add_listener(self._outbox.table, woken)
                woken()  # rows may have come while no one listened
                backoff = BACKOFF_MIN
                await closed.wait()
            except _DATABASE_DOWN:
                await asyncio.sleep(backoff)  # the stages poll meanwhile
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)

    async def _watch(self) -> None:
        """Depth and age gauges; removal of finished rows past NOTIFY_OUTBOX_RETENTION (and,
        without one, of the few finished rows the stages did not delete themselves)."""
        loop = asyncio.get_running_loop()
        next_expiry = loop.time()
        retention = self._settings.retention
        while True:
            with contextlib.suppress(*_DATABASE_DOWN, TimeoutError):
                async with (await self._database()).acquire() as conn:
                    depths, failed = await self._outbox.depth(conn)
                    if loop.time() >= next_expiry:
                        await self._outbox.expire(conn, retention)
                        next_expiry = loop.time() + EXPIRE_INTERVAL
                now = datetime.now(UTC)
                for stage, depth in depths.items():
                    self.metrics.depth.labels(stage.value).set(depth.rows)
                    age = 0.0 if depth.oldest is None else (now - depth.oldest).total_seconds()
                    self.metrics.oldest.labels(stage.value).set(max(0.0, age))
                self.metrics.failed_rows.set(failed)
            await asyncio.sleep(STATS_INTERVAL)

    async def _close(self) -> None:
        await self._forwarder.close()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        await self._redis.aclose()


def _missing_table(table: str) -> asyncpg.UndefinedTableError:
    return asyncpg.UndefinedTableError(
        f'relation "{table}" does not exist: create it with `notify outbox init`'
        " (or bridge/outbox/schema.sql)"
    )


def _set(event: asyncio.Event, *_args: Any) -> None:
    event.set()


async def _wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
