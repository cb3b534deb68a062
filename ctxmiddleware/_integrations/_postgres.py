"""PostgreSQL under a context: asyncpg, psycopg 3 (async and sync), SQLAlchemy asyncio.

Each helper opens a transaction that:

* fails fast with ``ctx.err()`` if the context is already done;
* sends the deadline to the server: ``SET LOCAL statement_timeout`` from
  ``ctx.remaining()``, so no query outlives the request even if this process dies;
* cancels the running query on the server when the context is done, whoever
  cancels the task and however (see :mod:`._guard`);
* leaves the connection clean: the transaction is rolled back, so no
  ``idle in transaction (aborted)`` backend is left and the pool can reuse it.

The drivers are imported only when a helper is called.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .._core._context import Context, current
from ._guard import OutOfBandCancel, statement_timeout_ms

__all__ = [
    "asyncpg_transaction",
    "psycopg_transaction",
    "psycopg_transaction_sync",
    "sqlalchemy_session",
]

_CANCEL_REQUEST_CODE = 80877102


def _asyncpg_cancel(conn: Any) -> Callable[[], None]:
    """A blocking, thread-safe CancelRequest for an asyncpg connection's backend."""
    protocol = conn._protocol
    pid, secret = protocol.backend_pid, protocol.backend_secret
    addr = conn._addr
    packet = struct.pack("!iiii", 16, _CANCEL_REQUEST_CODE, pid, secret)

    def cancel() -> None:
        if isinstance(addr, str):  # unix socket path
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(addr)
        else:
            sock = socket.create_connection((addr[0], addr[1]), timeout=5)
        with sock:
            sock.sendall(packet)
            # The server closes the connection once the backend is signalled.
            with contextlib.suppress(OSError):
                sock.recv(1)

    return cancel


def _driver_cancel(driver_conn: Any) -> Callable[[], object]:
    """An out-of-band cancel for a psycopg or asyncpg connection."""
    pgconn = getattr(driver_conn, "pgconn", None)
    if pgconn is not None:  # psycopg: libpq's PQcancel, thread-safe by design
        return pgconn.get_cancel().cancel  # type: ignore[no-any-return]
    if hasattr(driver_conn, "_protocol"):  # asyncpg
        return _asyncpg_cancel(driver_conn)
    raise TypeError(f"unsupported PostgreSQL connection: {type(driver_conn).__name__}")


@contextlib.asynccontextmanager
async def _errors_as(ctx: Context) -> AsyncIterator[None]:
    """Report a driver error caused by the context being done as ``ctx.err()``.

    (``statement_timeout`` firing on the server, a connection closed by a
    cancelled driver...) The driver's error stays attached as ``__cause__``.
    """
    try:
        yield
    except Exception as exc:
        err = ctx.err()
        if err is None or isinstance(exc, type(err)):
            raise
        raise err from exc


def _set_local(ms: int) -> str:
    return f"SET LOCAL statement_timeout = {int(ms)}"


@contextlib.asynccontextmanager
async def asyncpg_transaction(conn_or_pool: Any, ctx: Context | None = None) -> AsyncIterator[Any]:
    """An asyncpg connection in a transaction bound to ``ctx`` (default: ``current()``).

    ``conn_or_pool`` is an ``asyncpg.Connection`` or an ``asyncpg.Pool`` (a
    connection is acquired and released)::

        async with asyncpg_transaction(pool) as conn:
            rows = await conn.fetch("SELECT * FROM report($1)", day)

    When ``ctx`` is done the block is interrupted and raises ``ctx.err()``.
    """
    ctx = current() if ctx is None else ctx
    ms = statement_timeout_ms(ctx)
    async with contextlib.AsyncExitStack() as stack:
        import asyncpg

        conn = conn_or_pool
        if isinstance(conn_or_pool, asyncpg.Pool):
            conn = await stack.enter_async_context(conn_or_pool.acquire())
        # asyncpg sends its CancelRequest from a task of its own, so even a
        # level-triggered cancellation cannot interrupt it: no side channel.
        async with _errors_as(ctx), ctx.scope(), conn.transaction():
            if ms is not None:
                await conn.execute(_set_local(ms))
            yield conn


@contextlib.asynccontextmanager
async def psycopg_transaction(conn_or_pool: Any, ctx: Context | None = None) -> AsyncIterator[Any]:
    """A psycopg ``AsyncConnection`` in a transaction bound to ``ctx``.

    ``conn_or_pool`` is a ``psycopg.AsyncConnection`` or a
    ``psycopg_pool.AsyncConnectionPool``::

        async with psycopg_transaction(pool) as conn:
            cur = await conn.execute("SELECT pg_sleep(%s)", [10])
    """
    ctx = current() if ctx is None else ctx
    ms = statement_timeout_ms(ctx)
    async with contextlib.AsyncExitStack() as stack:
        conn = conn_or_pool
        if not hasattr(conn_or_pool, "pgconn"):
            conn = await stack.enter_async_context(conn_or_pool.connection())
        guard = OutOfBandCancel(ctx, _driver_cancel(conn))
        stack.push_async_callback(guard.aclose)
        async with _errors_as(ctx), ctx.scope(), conn.transaction():
            if ms is not None:
                await conn.execute(_set_local(ms))
            try:
                yield conn
            finally:
                await guard.aclose()  # before the rollback: a late cancel could hit it


@contextlib.contextmanager
def psycopg_transaction_sync(conn_or_pool: Any, ctx: Context | None = None) -> Iterator[Any]:
    """A sync psycopg ``Connection`` in a transaction bound to ``ctx``.

    For ``def`` endpoints and worker threads: the thread cannot be interrupted,
    so the context cancels the query on the server, and the block raises
    ``ctx.err()`` (chained to psycopg's ``QueryCanceled``)::

        with psycopg_transaction_sync(pool) as conn:
            rows = conn.execute("SELECT * FROM big_report").fetchall()
    """
    import psycopg

    ctx = current() if ctx is None else ctx
    ms = statement_timeout_ms(ctx)
    with contextlib.ExitStack() as stack:
        conn = conn_or_pool
        if not hasattr(conn_or_pool, "pgconn"):
            conn = stack.enter_context(conn_or_pool.connection())
        guard = OutOfBandCancel(ctx, _driver_cancel(conn))
        stack.callback(guard.close)
        try:
            with conn.transaction():
                if ms is not None:
                    conn.execute(_set_local(ms))
                try:
                    yield conn
                finally:
                    guard.close()
        except psycopg.OperationalError as exc:  # QueryCanceled included
            err = ctx.err()
            if err is not None:
                raise err from exc
            raise


@contextlib.asynccontextmanager
async def sqlalchemy_session(
    session_factory: Any, ctx: Context | None = None
) -> AsyncIterator[Any]:
    """An SQLAlchemy ``AsyncSession`` in a transaction bound to ``ctx``.

    ``session_factory`` is an ``async_sessionmaker`` (or an ``AsyncEngine``);
    the driver is asyncpg or psycopg::

        async with sqlalchemy_session(Session) as session:
            rows = (await session.execute(select(Order))).all()
    """
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.sql import text

    ctx = current() if ctx is None else ctx
    ms = statement_timeout_ms(ctx)
    if isinstance(session_factory, AsyncEngine):
        engine = session_factory

        def session_factory() -> AsyncSession:
            return AsyncSession(engine, expire_on_commit=False)

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(session_factory())
        async with _errors_as(ctx), ctx.scope(), session.begin():
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            guard = OutOfBandCancel(ctx, _driver_cancel(raw.driver_connection))
            stack.push_async_callback(guard.aclose)
            if ms is not None:
                await session.execute(text(_set_local(ms)))
            try:
                yield session
            finally:
                await guard.aclose()
