"""PostgreSQL under a context: asyncpg, psycopg 3 (async and sync), SQLAlchemy asyncio.

Each helper opens a transaction that:

* fails fast with ``ctx.err()`` if the context is already done; waiting for a
  pool connection counts against the deadline and is interrupted by the context;
* sends the deadline to the server: ``SET LOCAL statement_timeout`` set to what
  remains once the connection is acquired (rounded up, so the server never
  aborts before the context does). Even if this process stops cancelling (it
  hangs, or dies), the server ends the first statement by the deadline, and
  each later one by that budget from its own start (PostgreSQL times
  statements one by one);
* cancels the running query on the server when the context is done, whoever
  cancels the task and however (see :mod:`._guard`);
* like Go's ``database/sql``, is rolled back, not committed, if the context is
  done when the block ends; COMMIT and ROLLBACK themselves are never
  interrupted halfway (see :func:`._guard.run_to_end`);
* makes the outcome knowable: **if the helper returned, the transaction
  committed; if it raised ``ctx.err()``, it rolled back.** A COMMIT that
  completes is never reported as a failure, even when the deadline passed
  (or the client left) while it ran: the cancellation that landed then is
  delivered at the caller's next ``await`` after the helper returns (see
  :class:`._guard.CommitOutcome`). The same holds for what follows the
  COMMIT: handing the connection back to the pool (asyncpg's release and
  ``reset``, psycopg_pool's ``putconn``, SQLAlchemy's session close) runs to
  its end uninterrupted, and its errors are logged, not raised. If the pool
  has not taken the connection back 5 s after the COMMIT (a ``reset`` hook
  that hangs), the helper returns all the same and the release goes on in
  the background; an asyncpg connection still held by it is terminated (the
  pool opens a new one); psycopg_pool runs its ``reset`` in its own worker,
  so the helper never waits for it (see :class:`._guard.ReleaseStack`);
* leaves the connection clean: no ``idle in transaction (aborted)`` backend is
  left and the pool can reuse it.

The drivers are imported only when a helper is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

from .._core import (
    Context,
    after_func,
    async_errors_as_ctx_err,
    cancellation_as_ctx_err,
    current,
    downstream_call,
    raise_if_done,
)
from ._guard import (
    CommitOutcome,
    OutOfBandCancel,
    ReleaseStack,
    finish_uninterrupted,
    statement_timeout_ms,
)

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
        if driver_conn.closed:
            # Nothing can run on it; let psycopg report the closed connection.
            return lambda: None
        return pgconn.get_cancel().cancel  # type: ignore[no-any-return]
    if hasattr(driver_conn, "_protocol"):  # asyncpg
        return _asyncpg_cancel(driver_conn)
    raise TypeError(f"unsupported PostgreSQL connection: {type(driver_conn).__name__}")


def _check_target(target: object, helper: str, expected: str, *attributes: str) -> None:
    """A clear TypeError, at the call, for what is not a connection or pool
    (a DSN string, say), rather than an AttributeError from inside."""
    if isinstance(target, (str, bytes)) or not any(hasattr(target, a) for a in attributes):
        hint = " (a DSN: open a pool or connection first)" if isinstance(target, str) else ""
        raise TypeError(f"{helper}() takes {expected}, not {type(target).__name__}{hint}")


def _set_local(ms: int) -> str:
    return f"SET LOCAL statement_timeout = {int(ms)}"


@contextlib.asynccontextmanager
async def asyncpg_transaction(conn_or_pool: Any, ctx: Context | None = None) -> AsyncIterator[Any]:
    """An asyncpg connection in a transaction bound to ``ctx`` (default: ``current()``).

    ``conn_or_pool`` is an ``asyncpg.Connection`` or an ``asyncpg.Pool`` (a
    connection is acquired and released)::

        async with asyncpg_transaction(pool) as conn:
            rows = await conn.fetch("SELECT * FROM report($1)", day)

    When ``ctx`` is done the block is interrupted (waiting for the pool too)
    and raises ``ctx.err()``. If the helper returned, the transaction
    committed; if it raised ``ctx.err()``, it rolled back (a COMMIT under way
    at the deadline completes, and the helper returns).
    """
    ctx = current() if ctx is None else ctx
    statement_timeout_ms(ctx)  # fail fast, before touching the connection
    _check_target(
        conn_or_pool, "asyncpg_transaction", "an asyncpg Pool or Connection",
        "acquire", "transaction",
    )
    import asyncpg

    # cancellation_as_ctx_err: a cancellation landing outside the helper's
    # scope (during BEGIN, the ROLLBACK, the cancel's wait) still ends as ctx.err().
    async with (
        CommitOutcome() as outcome,
        cancellation_as_ctx_err(ctx),
        ReleaseStack(outcome) as stack,
    ):
        conn = conn_or_pool
        if isinstance(conn_or_pool, asyncpg.Pool):
            # Waiting for the pool is part of the request's time.
            async with async_errors_as_ctx_err(ctx), ctx.scope():
                conn = await stack.enter_async_context(conn_or_pool.acquire())
            stack.push_async_callback(_PoolSideCancel(ctx, conn_or_pool, conn).aclose)
        # asyncpg sends its CancelRequest from a task of its own, so even a
        # level-triggered cancellation cannot interrupt it: no side channel.
        tr = conn.transaction()
        stack.on_timeout = _terminate_unreleased(conn)
        async with (
            async_errors_as_ctx_err(ctx),
            finish_uninterrupted(tr, conn.terminate, _asyncpg_repair(conn, tr), outcome),
        ):
            # (asyncpg sends the CancelRequest itself when the task is cancelled.)
            with downstream_call(ctx, "asyncpg", "PostgreSQL transaction"):
                async with ctx.scope():
                    await _set_statement_timeout(ctx, conn.execute)
                    yield conn
            ctx.check()  # done after the block: roll back rather than commit


class _PoolSideCancel:
    """A faster cancel for an asyncpg pool's query: ``pg_cancel_backend()``
    over an idle connection of the same pool, besides asyncpg's own.

    asyncpg cancels with a CancelRequest on a new connection, for which
    PostgreSQL forks a process: several ms, tens under load (bench/bench_cascade.py).
    An idle pooled connection asks in one round trip. Both go, the first to
    land ends the query; asyncpg still waits for its own before the ROLLBACK.
    Only when asyncpg is cancelling a query, never with the pool exhausted
    (nobody waits for us); a late one hitting the ROLLBACK is repaired like a
    late CancelRequest (``_asyncpg_repair``). The helper waits for it before
    the connection goes back to the pool, so it cannot hit another request's query.
    """

    __slots__ = ("closed", "conn", "loop", "pool", "stop", "task", "tries")

    def __init__(self, ctx: Context, pool: Any, conn: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.conn = conn
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.tries = 0
        self.stop = after_func(ctx, self._from_thread)

    def _from_thread(self) -> None:
        with contextlib.suppress(RuntimeError):  # (the loop is closed)
            self.loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        if self.closed or self.task is not None:
            return
        raw = getattr(self.conn, "_con", None) or self.conn  # a PoolConnectionProxy's
        cancelling = getattr(getattr(raw, "_protocol", None), "_is_cancelling", None)
        if cancelling is None or self.pool.get_idle_size() < 1:
            return
        if not cancelling():
            # The task's cancellation may not have reached asyncpg yet: look
            # again for a few loop iterations (none if no query was running).
            self.tries += 1
            if self.tries < 20:
                self.loop.call_soon(self._start)
            return
        self.task = self.loop.create_task(self._cancel(raw.get_server_pid()))

    async def _cancel(self, pid: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0), self.pool.acquire(timeout=0.1) as other:
                await other.execute("SELECT pg_cancel_backend($1)", pid)

    async def aclose(self) -> None:
        self.closed = True
        self.stop()
        task = self.task
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)


def _terminate_unreleased(conn: Any) -> Callable[[], None]:
    """Terminate a pool's asyncpg connection that the pool has not taken back
    (its release hangs after the COMMIT): the pool then opens a new one."""

    def terminate() -> None:
        raw = getattr(conn, "_con", None)  # a PoolConnectionProxy's, until released
        if raw is not None:
            raw.terminate()

    return terminate


def _asyncpg_repair(conn: Any, tr: Any) -> Callable[[bool], Awaitable[None] | None]:
    """Get an asyncpg connection out of a transaction whose BEGIN or end failed.

    asyncpg forgets its transaction before the COMMIT/ROLLBACK succeeds, and
    after an interrupted BEGIN it keeps the failed one as the connection's
    outermost (the next ``transaction()`` would be a SAVEPOINT). Either way the
    server may still be inside the transaction, and a bare connection would
    stay there (a pool's ``reset()`` would roll it back).
    """
    raw = getattr(conn, "_con", None) or conn  # a pool's PoolConnectionProxy

    def in_transaction() -> bool:
        return not raw.is_closed() and bool(raw.is_in_transaction())

    def repair(entering: bool) -> Awaitable[None] | None:
        top = getattr(raw, "_top_xact", None)
        if top is not None and top is not tr:
            return None  # a nested transaction (SAVEPOINT): the outer one owns the state
        raw._top_xact = None
        if not entering and not in_transaction():
            return None  # the common case, decided without a round trip or a task
        return _rollback_until_idle(raw.execute, in_transaction, raw.terminate, entering)

    return repair


async def _rollback_until_idle(
    execute: Callable[[str], Awaitable[object]],
    in_transaction: Callable[[], bool],
    close: Callable[[], object],
    unknown: bool,
) -> None:
    """ROLLBACK until the server is out of the transaction, else close.

    A cancel request that arrives late (ours, the driver's, or the server's
    own statement timeout racing with them) can hit the first ROLLBACK.
    ``unknown``: the state is not known yet (BEGIN interrupted): roll back anyway.

    The one loop for every driver: a sync connection's blocking ``execute``
    goes through :func:`_rollback_until_idle_sync`.
    """
    for _ in range(3):
        if not unknown and not in_transaction():
            return
        unknown = False
        with contextlib.suppress(Exception):
            await execute("ROLLBACK")
    if in_transaction():
        close()


async def _set_statement_timeout(ctx: Context, execute: Callable[[str], Any]) -> None:
    # Computed now, after any wait for the pool and the BEGIN round trip: the
    # server must not let a query run past the context's deadline.
    ms = statement_timeout_ms(ctx)
    if ms is not None:
        await execute(_set_local(ms))


@contextlib.asynccontextmanager
async def psycopg_transaction(conn_or_pool: Any, ctx: Context | None = None) -> AsyncIterator[Any]:
    """A psycopg ``AsyncConnection`` in a transaction bound to ``ctx``.

    ``conn_or_pool`` is a ``psycopg.AsyncConnection`` or a
    ``psycopg_pool.AsyncConnectionPool``::

        async with psycopg_transaction(pool) as conn:
            cur = await conn.execute("SELECT pg_sleep(%s)", [10])

    Under a level-triggered cancellation (anyio scopes) psycopg closes the
    connection; the query is still cancelled on the server. If the helper
    returned, the transaction committed; if it raised ``ctx.err()``, it
    rolled back.
    """
    ctx = current() if ctx is None else ctx
    statement_timeout_ms(ctx)
    _check_target(
        conn_or_pool, "psycopg_transaction", "a psycopg AsyncConnection or AsyncConnectionPool",
        "pgconn", "connection",
    )
    # cancellation_as_ctx_err: a cancellation landing outside the helper's
    # scope (during BEGIN, the ROLLBACK, the cancel's wait) still ends as ctx.err().
    async with (
        CommitOutcome() as outcome,
        cancellation_as_ctx_err(ctx),
        ReleaseStack(outcome) as stack,
    ):
        conn = conn_or_pool
        if not hasattr(conn_or_pool, "pgconn"):
            async with async_errors_as_ctx_err(ctx), ctx.scope():
                conn = await stack.enter_async_context(conn_or_pool.connection())
        guard = OutOfBandCancel(
            ctx, _driver_cancel(conn), kind="psycopg", what="PostgreSQL transaction"
        )
        stack.push_async_callback(guard.aclose)
        repair = _psycopg_repair(conn) if _psycopg_idle(conn) else None
        async with (
            async_errors_as_ctx_err(ctx),
            finish_uninterrupted(conn.transaction(), _closer(conn), repair, outcome),
        ):
            try:
                async with ctx.scope():
                    await _set_statement_timeout(ctx, conn.execute)
                    yield conn
                ctx.check()
            finally:
                await guard.aclose()  # before the rollback: a late cancel could hit it


def _if_active(conn: Any, cancel: Callable[[], object]) -> Callable[[], None]:
    """Cancel again if a statement is running: the worker, between two
    statements when the context was done, has started another one. (Once one
    is cancelled the transaction is aborted and the next ones fail at once.)"""
    from psycopg.pq import TransactionStatus

    pgconn = conn.pgconn
    active = TransactionStatus.ACTIVE

    def again() -> None:
        if pgconn.transaction_status == active:
            cancel()

    return again


def _psycopg_idle(conn: Any) -> bool:
    """True if the helper's transaction will be the outermost one (not a SAVEPOINT)."""
    from psycopg.pq import TransactionStatus

    return bool(conn.pgconn.transaction_status == TransactionStatus.IDLE)


def _psycopg_in_transaction(conn: Any) -> Callable[[], bool]:
    """For a psycopg connection, sync or async: open and inside a transaction."""
    from psycopg.pq import TransactionStatus

    in_transaction_states = (TransactionStatus.INTRANS, TransactionStatus.INERROR)

    def in_transaction() -> bool:
        return not conn.closed and conn.pgconn.transaction_status in in_transaction_states

    return in_transaction


def _psycopg_repair(conn: Any) -> Callable[[bool], Awaitable[None] | None]:
    """Get a psycopg ``AsyncConnection`` out of a transaction whose BEGIN or end failed."""

    in_transaction = _psycopg_in_transaction(conn)

    def repair(entering: bool) -> Awaitable[None] | None:
        if conn.closed or (not entering and not in_transaction()):
            return None  # the common case, decided without a round trip or a task
        return _rollback_until_idle(conn.execute, in_transaction, _closer(conn), entering)

    return repair


def _rollback_until_idle_sync(conn: Any) -> None:
    """:func:`_rollback_until_idle` for a sync psycopg connection, in the calling thread.

    Its ``execute`` blocks and never suspends, so the coroutine runs to its end
    in a single step, without an event loop.
    """

    async def execute(sql: str) -> None:
        conn.execute(sql)

    _run_blocking(
        _rollback_until_idle(execute, _psycopg_in_transaction(conn), conn.close, unknown=False)
    )


def _run_blocking(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that awaits nothing that suspends (all its I/O blocks)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("a blocking coroutine suspended: it needs an event loop")


def _closer(conn: Any) -> Callable[[], None]:
    """Close a psycopg connection whose COMMIT/ROLLBACK could not finish."""

    def close() -> None:
        conn.pgconn.finish()

    return close


@contextlib.contextmanager
def psycopg_transaction_sync(conn_or_pool: Any, ctx: Context | None = None) -> Iterator[Any]:
    """A sync psycopg ``Connection`` in a transaction bound to ``ctx``.

    For ``def`` endpoints and worker threads: the thread cannot be interrupted,
    so the context cancels the query on the server (and any statement started
    after it was done), and the block raises ``ctx.err()`` (chained to
    psycopg's ``QueryCanceled``)::

        with psycopg_transaction_sync(pool) as conn:
            rows = conn.execute("SELECT * FROM big_report").fetchall()

    ``conn_or_pool`` is a ``psycopg.Connection`` or a
    ``psycopg_pool.ConnectionPool``, whose wait is bounded by the deadline.
    If the helper returned, the transaction committed (a COMMIT under way at
    the deadline is not interrupted); if it raised ``ctx.err()``, it rolled
    back.
    """
    import psycopg

    ctx = current() if ctx is None else ctx
    statement_timeout_ms(ctx)
    _check_target(
        conn_or_pool, "psycopg_transaction_sync", "a psycopg Connection or ConnectionPool",
        "pgconn", "connection",
    )
    try:
        with contextlib.ExitStack() as stack:
            conn = conn_or_pool
            if not hasattr(conn_or_pool, "pgconn"):
                remaining = ctx.remaining()
                conn = stack.enter_context(
                    conn_or_pool.connection()
                    if remaining is None
                    else conn_or_pool.connection(timeout=remaining)
                )
            cancel = _driver_cancel(conn)
            guard = OutOfBandCancel(
                ctx, cancel, again=_if_active(conn, cancel),
                kind="psycopg", what="PostgreSQL transaction",
            )
            stack.callback(guard.close)
            owned = _psycopg_idle(conn)  # not a SAVEPOINT inside the caller's transaction
            try:
                with conn.transaction():
                    try:
                        ms = statement_timeout_ms(ctx)
                        if ms is not None:
                            conn.execute(_set_local(ms))
                        yield conn
                        ctx.check()  # done after the block: roll back rather than commit
                    finally:
                        guard.close()
            except BaseException:
                if owned:  # a late cancel may have hit the ROLLBACK: try again
                    _rollback_until_idle_sync(conn)
                raise
    except psycopg.OperationalError as exc:  # QueryCanceled and PoolTimeout included
        raise_if_done(ctx, exc)
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

    A cancelled query costs the connection: SQLAlchemy invalidates it (the
    pool opens a new one), after the query is cancelled on the server. If
    the helper returned, the transaction committed; if it raised
    ``ctx.err()``, it rolled back.
    """
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.sql import text

    ctx = current() if ctx is None else ctx
    statement_timeout_ms(ctx)
    if not isinstance(session_factory, AsyncEngine) and not callable(session_factory):
        raise TypeError(
            "sqlalchemy_session() takes an async_sessionmaker or an AsyncEngine,"
            f" not {type(session_factory).__name__}"
        )
    if isinstance(session_factory, AsyncEngine):
        engine = session_factory

        def session_factory() -> AsyncSession:
            return AsyncSession(engine, expire_on_commit=False)

    # cancellation_as_ctx_err: a cancellation landing outside the helper's
    # scope (during BEGIN, the ROLLBACK, the cancel's wait) still ends as ctx.err().
    async with (
        CommitOutcome() as outcome,
        cancellation_as_ctx_err(ctx),
        ReleaseStack(outcome) as stack,
    ):
        session = await stack.enter_async_context(session_factory())
        async with (
            async_errors_as_ctx_err(ctx),
            finish_uninterrupted(session.begin(), outcome=outcome),
        ):
            guard: OutOfBandCancel | None = None
            try:
                async with ctx.scope():
                    # The pool checkout happens here, interruptible.
                    connection = await session.connection()
                    raw = await connection.get_raw_connection()
                    driver = raw.driver_connection
                    guard = OutOfBandCancel(
                        ctx, _driver_cancel(driver),
                        kind="psycopg" if hasattr(driver, "pgconn") else "asyncpg",
                        what="PostgreSQL transaction",
                    )
                    stack.push_async_callback(guard.aclose)
                    ms = statement_timeout_ms(ctx)
                    if ms is not None:
                        # One SQL text for every value: SQLAlchemy's asyncpg
                        # adapter prepares each statement, and a new text per
                        # request would churn its per-connection cache.
                        await session.execute(
                            text("SELECT set_config('statement_timeout', :ms, true)"),
                            {"ms": str(ms)},
                        )
                    yield session
                ctx.check()
            finally:
                if guard is not None:
                    await guard.aclose()
