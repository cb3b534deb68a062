"""SQLite under a context: ``sqlite3`` (sync) and ``aiosqlite``.

SQLite runs queries in the calling thread (sqlite3) or in a private worker
thread (aiosqlite), which nothing can cancel; cancelling an aiosqlite task
leaves its query running and blocking the connection. The context therefore
calls the connection's ``interrupt()``, which is thread-safe, the moment it
is done, and the interrupted statement raises ``ctx.err()``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .._core import Context, current, raise_if_done
from ._guard import OutOfBandCancel

__all__ = ["aiosqlite_interruptible", "sqlite_interruptible"]


@contextlib.contextmanager
def _interrupt_as_ctx_err(ctx: Context) -> Iterator[None]:
    """Report the interrupt ``ctx`` caused as ``ctx.err()``, chained to sqlite's error.

    Any other error (``database is locked``...) propagates untouched, even once
    ``ctx`` is done.
    """
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc):
            raise_if_done(ctx, exc)
        raise


@contextlib.contextmanager
def sqlite_interruptible(
    conn: sqlite3.Connection, ctx: Context | None = None
) -> Iterator[sqlite3.Connection]:
    """Interrupt ``conn``'s running statement when ``ctx`` (default ``current()``) is done::

        with sqlite_interruptible(conn, ctx):
            rows = conn.execute(SLOW_QUERY).fetchall()   # raises ctx.err() if cut short
    """
    ctx = current() if ctx is None else ctx
    ctx.check()
    guard = OutOfBandCancel(
        ctx, conn.interrupt, again=conn.interrupt, kind="sqlite", what="SQLite statement"
    )
    try:
        with _interrupt_as_ctx_err(ctx):
            yield conn
    finally:
        guard.close()


@contextlib.asynccontextmanager
async def aiosqlite_interruptible(db: Any, ctx: Context | None = None) -> AsyncIterator[Any]:
    """The same for an ``aiosqlite.Connection``, which also cancels the awaiting task::

        async with aiosqlite_interruptible(db):
            async with db.execute(SLOW_QUERY) as cursor:
                rows = await cursor.fetchall()
    """
    ctx = current() if ctx is None else ctx
    ctx.check()
    raw: sqlite3.Connection = db._connection  # aiosqlite keeps the sqlite3 connection here
    guard = OutOfBandCancel(
        ctx, raw.interrupt, again=raw.interrupt, kind="aiosqlite", what="SQLite statement"
    )
    try:
        with _interrupt_as_ctx_err(ctx):
            async with ctx.scope():
                yield db
    finally:
        await guard.aclose()
