"""SQLite under a context: ``sqlite_interruptible`` (sqlite3) and ``aiosqlite_interruptible``.

The slow query counts an endless recursive CTE: only an interrupt ends it. Its
first row calls ``mark()``, which sets an event, so the tests know the
statement is running before they cancel. A worker that is not interrupted
within the bound is unstuck by the test itself (``conn.interrupt()``) and the
test fails, instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import SERVERS, raw_request, serve
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ctxmiddleware import (
    Canceled,
    ContextMiddleware,
    DeadlineExceeded,
    aiosqlite_interruptible,
    background,
    sqlite_interruptible,
    with_cancel,
    with_timeout,
)

WAIT = 5.0  # upper bound for anything awaited; reached only on failure
BOUND = 1.0  # an interrupted statement must stop within this (typical: well under 1 ms)

SLOW = (
    "WITH RECURSIVE c(x) AS (SELECT mark() UNION ALL SELECT x + 1 FROM c) "
    "SELECT count(*) FROM c"
)

pytestmark = pytest.mark.timeout(60)


def connect(started: threading.Event, check_same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", check_same_thread=check_same_thread)
    conn.create_function("mark", 0, lambda: started.set() or 1)
    return conn


class Worker:
    """Runs ``fn(conn)`` in a thread; records the outcome and when it ended."""

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.started = threading.Event()
        self.conn = connect(self.started, check_same_thread=False)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.t_end = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.fn(self.conn)
        except BaseException as exc:
            self.error = exc
        finally:
            self.t_end = time.perf_counter()

    def start(self) -> Worker:
        self.thread.start()
        assert self.started.wait(WAIT), "the slow statement never started"
        return self

    def join(self, bound: float = BOUND) -> None:
        self.thread.join(bound)
        if self.thread.is_alive():
            self.conn.interrupt()  # unstick it, then fail
            self.thread.join(WAIT)
            pytest.fail(f"the statement was not interrupted within {bound}s")

    def close(self) -> None:
        self.conn.close()


def _assert_interrupted(err: BaseException | None, kind: type[BaseException]) -> None:
    assert isinstance(err, kind), repr(err)
    assert isinstance(err.__cause__, sqlite3.OperationalError), repr(err.__cause__)
    assert "interrupt" in str(err.__cause__)


# -- sqlite3 in a worker thread -------------------------------------------------


def test_deadline_interrupts_statement_in_worker_thread() -> None:
    ctx, cancel = with_timeout(background(), 0.05)

    def work(conn: sqlite3.Connection) -> Any:
        with sqlite_interruptible(conn, ctx):
            return conn.execute(SLOW).fetchone()

    worker = Worker(work)
    try:
        worker.start()
        worker.join(0.05 + BOUND)
        _assert_interrupted(worker.error, DeadlineExceeded)
        deadline = ctx.deadline()
        assert deadline is not None
        late = worker.t_end - (deadline - time.monotonic() + time.perf_counter())
        print(f"interrupted {late * 1000:.2f} ms after the deadline")
        # Usable right away: the interrupt was for that statement only.
        assert worker.conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cancel()
        worker.close()


def test_cancel_from_another_thread_interrupts_statement() -> None:
    ctx, cancel = with_cancel(background())

    def work(conn: sqlite3.Connection) -> Any:
        with sqlite_interruptible(conn, ctx):
            return conn.execute(SLOW).fetchone()

    worker = Worker(work).start()
    try:
        t0 = time.perf_counter()
        cancel()
        worker.join()
        _assert_interrupted(worker.error, Canceled)
        assert worker.t_end - t0 <= BOUND
        print(f"interrupted {(worker.t_end - t0) * 1000:.2f} ms after cancel()")
        assert worker.conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        worker.close()


def test_cancel_between_statements_interrupts_the_next_one() -> None:
    """Cancelled while the worker runs Python code between two statements
    (interrupt() then has nothing to stop): the next statement must not run
    to its end."""
    ctx, cancel = with_cancel(background())
    between = threading.Event()
    go_on = threading.Event()

    def work(conn: sqlite3.Connection) -> Any:
        with sqlite_interruptible(conn, ctx):
            conn.execute("SELECT 1").fetchone()
            between.set()
            assert go_on.wait(WAIT)  # "Python work" while the context is cancelled
            return conn.execute(SLOW).fetchone()

    started = threading.Event()
    worker = Worker(work)
    worker.started = started
    worker.conn.create_function("mark", 0, lambda: started.set() or 1)
    worker.thread.start()
    try:
        assert between.wait(WAIT)
        cancel()
        time.sleep(0.01)  # let the out-of-band interrupt pass while nothing runs
        go_on.set()
        worker.join()
        _assert_interrupted(worker.error, Canceled)
        assert worker.conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        worker.close()


def test_no_interrupt_after_the_block() -> None:
    """Once the block is over, cancelling the context touches the connection no more."""
    started = threading.Event()
    conn = connect(started)
    try:
        ctx, cancel = with_cancel(background())
        with sqlite_interruptible(conn, ctx):
            assert conn.execute("SELECT 1").fetchone() == (1,)
        cancel()
        time.sleep(0.01)  # a stray interrupt would have had time to land
        bounded = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 200000) "
        assert conn.execute(bounded + "SELECT count(*) FROM c").fetchone() == (200000,)
    finally:
        conn.close()


def test_block_exits_while_interrupt_is_running_waits_for_it() -> None:
    """Cancelled and exited at once, many times: a late interrupt must never hit
    the statement after the block."""
    started = threading.Event()
    conn = connect(started, check_same_thread=False)
    bounded = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 20000) "
    try:
        for _ in range(200):
            ctx, cancel = with_cancel(background())
            with contextlib.suppress(Canceled), sqlite_interruptible(conn, ctx):
                cancel()
            assert conn.execute(bounded + "SELECT count(*) FROM c").fetchone() == (20000,)
    finally:
        conn.close()


def test_done_context_fails_fast() -> None:
    started = threading.Event()
    conn = connect(started)
    try:
        for ctx_err in _done_contexts():
            ctx, err = ctx_err
            with pytest.raises(err), sqlite_interruptible(conn, ctx):
                conn.execute(SLOW)
            assert not started.is_set()
    finally:
        conn.close()


def _done_contexts() -> list[tuple[Any, type[BaseException]]]:
    cancelled, cancel = with_cancel(background())
    cancel()
    expired, _ = with_timeout(background(), -1)
    return [(cancelled, Canceled), (expired, DeadlineExceeded)]


def test_other_errors_pass_through() -> None:
    started = threading.Event()
    conn = connect(started)
    try:
        ctx, cancel = with_cancel(background())
        with pytest.raises(sqlite3.OperationalError, match="syntax"), sqlite_interruptible(
            conn, ctx
        ):
            conn.execute("SELEC 1")
        cancel()
    finally:
        conn.close()


def test_interrupt_latency() -> None:
    """cancel() in one thread -> OperationalError in the worker: typically well under 1 ms."""
    latencies = []
    for _ in range(30):
        ctx, cancel = with_cancel(background())

        def work(conn: sqlite3.Connection, ctx: Any = ctx) -> Any:
            with sqlite_interruptible(conn, ctx):
                return conn.execute(SLOW).fetchone()

        worker = Worker(work).start()
        try:
            t0 = time.perf_counter()
            cancel()
            worker.join()
            _assert_interrupted(worker.error, Canceled)
            latencies.append(worker.t_end - t0)
        finally:
            worker.close()
    p50 = statistics.median(latencies)
    print(f"interrupt latency p50 {p50 * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms")
    assert p50 <= 0.05  # generous for a loaded CI machine
    assert max(latencies) <= BOUND


# -- aiosqlite --------------------------------------------------------------------

aiosqlite = pytest.importorskip("aiosqlite")


async def _aio_connect() -> tuple[Any, asyncio.Event]:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    def mark() -> int:
        loop.call_soon_threadsafe(started.set)
        return 1

    db = await aiosqlite.connect(":memory:")
    await db.create_function("mark", 0, mark)
    return db, started


async def _slow(db: Any) -> Any:
    async with db.execute(SLOW) as cursor:
        return await cursor.fetchone()


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_aiosqlite_interrupted_connection_usable_immediately(how: str) -> None:
    async def main() -> None:
        db, started = await _aio_connect()
        try:
            if how == "cancel":
                ctx, cancel = with_cancel(background())
            else:
                ctx, cancel = with_timeout(background(), 0.05)

            async def use() -> Any:
                async with aiosqlite_interruptible(db, ctx):
                    return await _slow(db)

            task = asyncio.create_task(use())
            await asyncio.wait_for(started.wait(), WAIT)
            t0 = time.perf_counter()
            if how == "cancel":
                cancel()
            with pytest.raises(Canceled if how == "cancel" else DeadlineExceeded):
                await asyncio.wait_for(task, 0.05 + BOUND)
            # The next statement is served right away: the query was stopped,
            # not just the task awaiting it.
            t1 = time.perf_counter()
            async with db.execute("SELECT 1") as cursor:
                assert await asyncio.wait_for(cursor.fetchone(), BOUND) == (1,)
            t2 = time.perf_counter()
            print(f"aiosqlite {how}: task ended {(t1 - t0) * 1000:.2f} ms, "
                  f"next SELECT 1 took {(t2 - t1) * 1000:.2f} ms")
            cancel()
        finally:
            await db.interrupt()
            await db.close()

    asyncio.run(main())


def test_aiosqlite_without_helper_query_keeps_running() -> None:
    """The control: cancelling the task alone leaves the statement running in
    aiosqlite's thread, and the connection blocked."""

    async def main() -> None:
        db, started = await _aio_connect()
        try:
            task = asyncio.create_task(_slow(db))
            await asyncio.wait_for(started.wait(), WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(db.execute("SELECT 1"), 0.2)
        finally:
            await db.interrupt()
            await db.close()

    asyncio.run(main())


def test_aiosqlite_done_context_fails_fast() -> None:
    async def main() -> None:
        db, started = await _aio_connect()
        try:
            for ctx, err in _done_contexts():
                with pytest.raises(err):
                    async with aiosqlite_interruptible(db, ctx):
                        await _slow(db)
            assert not started.is_set()
        finally:
            await db.close()

    asyncio.run(main())


# -- through the middleware: a def endpoint, the client disconnects --------------


@contextlib.contextmanager
def _app() -> Iterator[tuple[Any, dict[str, Any], threading.Event, threading.Event]]:
    started = threading.Event()
    ended = threading.Event()
    record: dict[str, Any] = {}

    def slow(request: Request) -> PlainTextResponse:
        conn = sqlite3.connect(":memory:")  # in the worker thread
        conn.create_function("mark", 0, lambda: started.set() or 1)
        try:
            with sqlite_interruptible(conn):  # the request's context
                try:
                    conn.execute(SLOW).fetchone()
                except sqlite3.OperationalError as exc:
                    record["driver_error"] = exc
                    raise
        except BaseException as exc:
            record["t_end"] = time.perf_counter()
            record["error"] = exc
            raise
        finally:
            conn.close()
            ended.set()
        return PlainTextResponse("done")

    app = Starlette(
        routes=[Route("/slow", slow)], middleware=[Middleware(ContextMiddleware, timeout=30)]
    )
    yield app, record, started, ended


@pytest.mark.parametrize("kind", SERVERS)
def test_client_disconnect_interrupts_def_endpoint(kind: str) -> None:
    with _app() as (app, record, started, ended), serve(app, kind) as server:
        sock = server.connect()
        try:
            sock.sendall(raw_request("GET", "/slow"))
            assert started.wait(WAIT)
            t_close = time.perf_counter()
        finally:
            sock.close()
        assert ended.wait(BOUND), "the sqlite statement was not interrupted"
        # Not via __cause__: ctx.err() is one shared instance, and the
        # middleware raises it too, from the loop thread, with its own cause.
        assert isinstance(record["error"], Canceled), repr(record["error"])
        assert "interrupt" in str(record["driver_error"])
        print(f"{kind}: interrupted {(record['t_end'] - t_close) * 1000:.2f} ms after close")
        assert record["t_end"] - t_close <= BOUND
