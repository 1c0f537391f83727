"""The outbox table as the relay sees it: its schema, claiming lanes, and recording progress.

Each stage (notify, forward) works on the rows it has not done yet, lane by lane. A relay
claims lanes with advisory locks, one key per stage and lane, so a lane is worked on by one
relay at a time, in id order. The locks are the session's, held while the batch's work is
done (Redis, Kafka) outside any transaction, and released after the short transaction that
records it: no row stays locked while waiting on a network, so the two stages, which mark
the same rows, do not wait on each other. A relay killed mid-batch loses its session, and
with it the locks; its rows are still to do. The rows are read in a statement of their own
after the locks are taken, so that it sees what the lane's previous holder recorded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from importlib import resources
from typing import Any, NamedTuple

LANES = 64


class Stage(Enum):
    NOTIFY = "notify"
    FORWARD = "forward"


NOTIFY, FORWARD = Stage.NOTIFY, Stage.FORWARD

_PENDING = {
    NOTIFY: "notified_at IS NULL AND failed_at IS NULL",
    FORWARD: "forwarded_at IS NULL AND topic IS NOT NULL AND failed_at IS NULL",
}
_DONE_COLUMN = {NOTIFY: "notified_at", FORWARD: "forwarded_at"}
# The row is done with by the stage that is not this one (a row without a topic is never
# forwarded).
_OTHER_DONE = {
    NOTIFY: "(forwarded_at IS NOT NULL OR topic IS NULL)",
    FORWARD: "notified_at IS NOT NULL",
}


class Row(NamedTuple):
    """A row to do, in the column order of :meth:`Outbox.claim`'s query (a tuple: built
    a thousand times per batch)."""

    id: int
    event_id: str
    key: str
    payload: str
    topic: str | None
    created_at: datetime
    attempts: int
    notified: bool


@dataclass(slots=True)
class Outcome:
    """A stage's work on a batch, as it is recorded: rows done, failed for good (with why),
    rejected (tried again later), and the error that stopped the work before the rest, if
    one did."""

    done: list[int] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Depth:
    """Rows a stage has still to do, and when the oldest of them was written."""

    rows: int
    oldest: datetime | None


def schema(table: str) -> str:
    """The DDL of the outbox table (bridge/outbox/schema.sql) under the name ``table``."""
    text = resources.files(__package__).joinpath("schema.sql").read_text()
    return text.replace("notify_outbox", table)


class Outbox:
    """The SQL of one outbox table; every method runs on the connection it is given."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._lock_space = {
            stage: _int32(zlib.crc32(f"{table}:{stage.value}".encode())) for stage in Stage
        }

    async def create(self, conn: Any) -> None:
        """Create the table if missing; concurrent callers wait for each other."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_space[NOTIFY])
            await conn.execute(schema(self.table))

    async def exists(self, conn: Any) -> bool:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", self.table))

    async def claim(self, conn: Any, stage: Stage, lanes: int, rows: int) -> list[Row]:
        """Lock up to ``lanes`` lanes with work for ``stage`` (in a random order, so relays
        spread over them) and return their oldest ``rows`` rows to do, in id order.

        The locks are held until :meth:`release`, or until the connection is gone.
        """
        pending = _PENDING[stage]
        # OFFSET 0 keeps the lock call from being evaluated before the EXISTS: a lane is
        # only locked if it has work.
        locked = await conn.fetch(
            f"""
            SELECT lane FROM (
                SELECT lane FROM (SELECT generate_series(0, {LANES - 1}) AS lane) all_lanes
                WHERE EXISTS (SELECT 1 FROM {self.table} o WHERE o.lane = all_lanes.lane
                              AND {pending})
                ORDER BY random() OFFSET 0
            ) waiting
            WHERE pg_try_advisory_lock($1, lane)
            LIMIT $2
            """,
            self._lock_space[stage],
            lanes,
        )
        if not locked:
            return []
        records = await conn.fetch(
            f"""
            SELECT id, event_id, key, payload::text AS payload, topic, created_at, attempts,
                   notified_at IS NOT NULL AS notified
            FROM {self.table}
            WHERE lane = ANY($1::smallint[]) AND {pending}
            ORDER BY id LIMIT $2
            """,
            [record["lane"] for record in locked],
            rows,
        )
        return [Row._make(record) for record in records]

    async def release(self, conn: Any) -> None:
        """Release the lanes :meth:`claim` locked on this connection."""
        await conn.execute("SELECT pg_advisory_unlock_all()")

    async def done(self, conn: Any, stage: Stage, ids: list[int], delete: bool) -> None:
        """Record that ``stage`` is done with ``ids``.

        With ``delete``, a row the other stage is done with already is deleted instead of
        marked: one UPDATE and one DELETE per row rather than two UPDATEs and a DELETE (each
        UPDATE writes a new row version and index entries). The rows are locked first, in
        id order, so the two stages take turns on each row (and never deadlock): the second
        one sees the first one's mark and deletes.
        """
        if not ids:
            return
        await conn.execute(
            f"SELECT 1 FROM {self.table} WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
            ids,
        )
        if delete:
            deleted = await conn.fetch(
                f"DELETE FROM {self.table} WHERE id = ANY($1::bigint[]) AND {_OTHER_DONE[stage]}"
                " RETURNING id",
                ids,
            )
            if deleted:
                gone = {record["id"] for record in deleted}
                ids = [row_id for row_id in ids if row_id not in gone]
        if ids:
            column = _DONE_COLUMN[stage]
            await conn.execute(
                f"UPDATE {self.table} SET {column} = now() WHERE id = ANY($1::bigint[])", ids
            )

    async def fail(self, conn: Any, failures: dict[int, str]) -> None:
        """Set rows aside for good, with why."""
        if not failures:
            return
        await conn.execute(
            f"""
            UPDATE {self.table} o SET failed_at = now(), failure = f.failure
            FROM unnest($1::bigint[], $2::text[]) AS f(id, failure) WHERE o.id = f.id
            """,
            list(failures),
            list(failures.values()),
        )

    async def rejected(self, conn: Any, ids: list[int]) -> None:
        """Count an attempt Redis rejected; the rows stay to do."""
        if ids:
            await conn.execute(
                f"UPDATE {self.table} SET attempts = attempts + 1 WHERE id = ANY($1::bigint[])",
                ids,
            )

    async def expire(self, conn: Any, retention: int) -> int:
        """Delete finished rows older than ``retention`` seconds; how many."""
        status: str = await conn.execute(
            f"""DELETE FROM {self.table}
            WHERE {_FINISHED} AND created_at < now() - $1 * interval '1 second'""",
            float(retention),
        )
        return int(status.split()[-1])

    async def depth(self, conn: Any) -> tuple[dict[Stage, Depth], int]:
        """Each stage's rows to do and their oldest, and the failed rows."""
        record = await conn.fetchrow(
            f"""
            SELECT count(*) FILTER (WHERE {_PENDING[NOTIFY]}) AS notify,
                   min(created_at) FILTER (WHERE {_PENDING[NOTIFY]}) AS notify_oldest,
                   count(*) FILTER (WHERE {_PENDING[FORWARD]}) AS forward,
                   min(created_at) FILTER (WHERE {_PENDING[FORWARD]}) AS forward_oldest,
                   count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed
            FROM {self.table}
            WHERE ({_PENDING[NOTIFY]}) OR ({_PENDING[FORWARD]}) OR failed_at IS NOT NULL
            """
        )
        depths = {
            stage: Depth(record[stage.value], record[f"{stage.value}_oldest"]) for stage in Stage
        }
        return depths, int(record["failed"])

    async def failed(self, conn: Any, limit: int) -> list[dict[str, Any]]:
        """The most recent failed rows, newest first."""
        records = await conn.fetch(
            f"""
            SELECT id, event_id, event_type, key, created_at, failed_at, failure
            FROM {self.table} WHERE failed_at IS NOT NULL ORDER BY id DESC LIMIT $1
            """,
            limit,
        )
        return [dict(record) for record in records]


# Both stages are done with the row (a row without a topic is never forwarded).
_FINISHED = "notified_at IS NOT NULL AND (forwarded_at IS NOT NULL OR topic IS NULL)"


def _int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value
