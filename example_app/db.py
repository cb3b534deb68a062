"""The demo's database: SQLite (embedded, the default) or PostgreSQL (``DATABASE_URL``).

Either way a query runs under the request's context and stops when it is done:
SQLite runs in a worker thread that ``sqlite_interruptible`` interrupts,
PostgreSQL (asyncpg) is cancelled on the server.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import anyio

import ctxmiddleware
from ctxmiddleware import Context

# A genuinely slow SQLite query: counting through a recursive CTE takes
# roughly 0.5 s per million rows here.
_SQLITE_SLOW = """
WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < ?)
SELECT count(*) FROM r
"""
_SQLITE_ROWS_PER_SECOND = 2_000_000


class Database:
    """What the endpoints need: one slow report query, whichever engine."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url if url is not None else os.environ.get("DATABASE_URL", "")
        is_pg = self.url.startswith(("postgres://", "postgresql://"))
        self.kind = "postgresql" if is_pg else "sqlite"
        self._pool: Any = None

    async def open(self) -> None:
        if self.kind == "postgresql":
            import asyncpg

            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=10)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def slow_report(self, seconds: float, ctx: Context) -> str:
        """A query taking about ``seconds``; raises ``ctx.err()`` if cut short."""
        if self.kind == "postgresql":
            async with ctxmiddleware.asyncpg_transaction(self._pool, ctx) as conn:
                await conn.execute("SELECT pg_sleep($1)", seconds)
                return f"postgresql report after {seconds} s"
        rows = int(seconds * _SQLITE_ROWS_PER_SECOND)
        count = await anyio.to_thread.run_sync(self._sqlite_count, rows, ctx)
        return f"sqlite report: {count} rows"

    @staticmethod
    def _sqlite_count(rows: int, ctx: Context) -> int:
        conn = sqlite3.connect(":memory:")
        try:
            with ctxmiddleware.sqlite_interruptible(conn, ctx):
                return int(conn.execute(_SQLITE_SLOW, (rows,)).fetchone()[0])
        finally:
            conn.close()
