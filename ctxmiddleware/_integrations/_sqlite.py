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

from .._core._context import Context, current
from ._guard import OutOfBandCancel

__all__ = ["aiosqlite_interruptible", "sqlite_interruptible"]


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "interrupt" in str(exc)


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
    guard = OutOfBandCancel(ctx, conn.interrupt, again=conn.interrupt)
    try:
        yield conn
    except sqlite3.OperationalError as exc:
        _raise_ctx_error_if_interrupted(ctx, exc)
        raise
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
    guard = OutOfBandCancel(ctx, raw.interrupt, again=raw.interrupt)
    try:
        async with ctx.scope():
            yield db
    except sqlite3.OperationalError as exc:
        _raise_ctx_error_if_interrupted(ctx, exc)
        raise
    finally:
        await guard.aclose()


def _raise_ctx_error_if_interrupted(ctx: Context, exc: sqlite3.OperationalError) -> None:
    """Raise ``ctx.err()`` (from ``exc``) if ``exc`` is the interrupt ``ctx`` caused."""
    err = ctx.err()
    if err is not None and _interrupted(exc):
        raise err.with_traceback(None) from exc
