"""``notify outbox init`` and ``notify outbox failed``: the table, for whoever operates it."""

from __future__ import annotations

import asyncpg

from notify.config import OutboxTable

from .store import Outbox


async def init(settings: OutboxTable) -> None:
    """Create the outbox table, its indexes and its wake-up trigger (idempotent)."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        await Outbox(settings.table).create(conn)
    finally:
        await conn.close()
    print(f"{settings.table}: ready")


async def show_failed(settings: OutboxTable, limit: int) -> None:
    """Print the most recent failed rows, newest first, one line each."""
    conn = await asyncpg.connect(settings.dsn)
    try:
        rows = await Outbox(settings.table).failed(conn, limit)
    finally:
        await conn.close()
    for row in rows:
        print(
            f"{row['id']}  {row['failed_at']:%Y-%m-%d %H:%M:%S}  {row['event_type']}  "
            f"event_id={row['event_id']}  key={row['key']}  {row['failure']}"
        )
    if not rows:
        print(f"{settings.table}: no failed rows")
