"""The PostgreSQL helpers against a real server: the query must die *on the server*.

Every cancellation test identifies the backend (pid) running ``pg_sleep(30)``
and polls ``pg_stat_activity`` from a separate monitor connection (every 2 ms)
until that backend is no longer ``active``; raising in Python is not enough.

* over a real server (``servers.serve``): client disconnect, the middleware's
  deadline (504), and a ``StreamingResponse`` body, which Starlette cancels with
  a level-triggered anyio scope (what the out-of-band cancel in ``_guard.py``
  is for); after each, the pool/connection must be healthy;
* in process: ``SET LOCAL statement_timeout`` (what remains after waiting for
  the pool, rounded up; the server enforces it even when Python never
  cancels), deadlines interrupting pool waits, the same connection cancelled
  again and again, transaction edges (interrupted BEGIN, context done when
  the block ends, COMMIT in progress at the deadline, a failed ROLLBACK, a
  statement started after the cancellation), fail-fast on a done context,
  and 1,000 randomly cancelled requests leaving pools and bare connections
  clean.

Drivers: asyncpg (connection, pool), psycopg async (connection,
``psycopg_pool.AsyncConnectionPool``), psycopg sync in a worker thread (Starlette
``def`` endpoint, ``asyncio.to_thread``), SQLAlchemy asyncio over asyncpg and
over psycopg.

Needs PostgreSQL at ``$CTXMIDDLEWARE_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``): skipped when unreachable,
failed instead when ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from helpers import PgMonitor as Monitor
from servers import SERVERS, RunningServer, raw_request, read_response, serve

asyncpg = pytest.importorskip("asyncpg")
psycopg = pytest.importorskip("psycopg")
sqlalchemy = pytest.importorskip("sqlalchemy")

import httpx  # noqa: E402
from sqlalchemy.ext.asyncio import (  # noqa: E402
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql import text  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from ctxmiddleware import (  # noqa: E402
    Canceled,
    Context,
    ContextError,
    ContextMiddleware,
    DeadlineExceeded,
    asyncpg_transaction,
    background,
    bind,
    psycopg_transaction,
    psycopg_transaction_sync,
    sqlalchemy_session,
    with_cancel,
    with_timeout,
)
from ctxmiddleware._integrations import _guard, _postgres  # noqa: E402

try:
    import psycopg_pool
except ImportError:  # optional: the pool variants are skipped
    psycopg_pool = None

DSN = os.environ.get("CTXMIDDLEWARE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
# Every backend of this run carries this application_name prefix, so tests
# running at the same time against the same server do not see each other.
APP = f"ctxmw{os.getpid()}"
WAIT = 5.0  # upper bound for anything awaited; reached only on failure
BOUND = 1.0  # a cancelled query must be off the server within this (typical: a few ms)
POLL = 0.002

pytestmark = pytest.mark.timeout(60)

ASYNC_DRIVERS = [
    "asyncpg-conn",
    "asyncpg-pool",
    "psycopg-conn",
    "psycopg-pool",
    "sa-asyncpg",
    "sa-psycopg",
]
THREAD_DRIVERS = ["psycopg-sync-def", "psycopg-sync-thread"]
DRIVERS = ASYNC_DRIVERS + THREAD_DRIVERS
POOL_SIZE = 2


def _needs(driver: str) -> Any:
    marks = []
    # The sync variants use a psycopg_pool.ConnectionPool too.
    if driver in ("psycopg-pool", *THREAD_DRIVERS) and psycopg_pool is None:
        marks.append(pytest.mark.skip(reason="psycopg_pool not installed"))
    return pytest.param(driver, marks=marks, id=driver)


DRIVER_PARAMS = [_needs(d) for d in DRIVERS]


@pytest.fixture(scope="module", autouse=True)
def postgres() -> None:
    """Skip the module when PostgreSQL is unreachable; fail instead on CI."""
    try:
        with psycopg.connect(DSN, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL not reachable at {DSN}: {exc}".strip()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


# -- watching the server ------------------------------------------------------


@pytest.fixture(scope="module")
def monitor() -> Iterator[Monitor]:
    m = Monitor(DSN, application_name=f"{APP}-monitor")
    yield m
    m.close()


# -- the app ------------------------------------------------------------------


class Probe:
    """What the app reports to the test thread (threading events, never asyncio)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.data: dict[str, Any] = {}

    def reset(self) -> None:
        self.started.clear()
        self.ended.clear()
        self.data.clear()

    def start(self, pid: int) -> None:
        self.data["pid"] = pid
        self.started.set()

    def end(self, exc: BaseException | None) -> None:
        self.data["t_end"] = time.perf_counter()
        self.data["exc"] = exc
        self.ended.set()

    def wait_started(self) -> int:
        assert self.started.wait(WAIT), "the query never started"
        return int(self.data["pid"])

    def wait_ended(self) -> BaseException | None:
        assert self.ended.wait(WAIT), "the handler never ended"
        exc = self.data["exc"]
        assert exc is None or isinstance(exc, BaseException)
        return exc


class Resources:
    """One app's connections and pools, opened lazily on the server's loop.

    Each driver's backends carry the application_name ``{prefix}-{driver}``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._objects: dict[str, Any] = {}
        self._alock: asyncio.Lock | None = None
        self._tlock = threading.Lock()

    def app_name(self, driver: str) -> str:
        return f"{self.prefix}-{driver}"

    async def get(self, driver: str) -> Any:
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:
            if driver not in self._objects:
                self._objects[driver] = await _open_async(driver, self.app_name(driver))
            return self._objects[driver]

    def get_sync(self, driver: str) -> Any:
        with self._tlock:
            if driver not in self._objects:
                self._objects[driver] = _open_sync(self.app_name(driver))
            return self._objects[driver]

    async def aclose(self) -> None:
        for obj in self._objects.values():
            await _close(obj)
        self._objects.clear()

    async def reset(self, driver: str) -> None:
        """Drop ``driver``'s object; the next use opens a new one."""
        obj = self._objects.pop(driver, None)
        if obj is not None:
            await _close(obj)


async def _open_async(driver: str, app_name: str, size: int = POOL_SIZE) -> Any:
    if driver == "asyncpg-conn":
        return await asyncpg.connect(DSN, server_settings={"application_name": app_name})
    if driver == "asyncpg-pool":
        return await asyncpg.create_pool(
            DSN,
            min_size=size,
            max_size=size,
            server_settings={"application_name": app_name},
        )
    if driver == "psycopg-conn":
        return await psycopg.AsyncConnection.connect(
            DSN, autocommit=True, application_name=app_name
        )
    if driver == "psycopg-pool":
        assert psycopg_pool is not None
        pool = psycopg_pool.AsyncConnectionPool(
            DSN,
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True, "application_name": app_name},
            open=False,
        )
        await pool.open(wait=True, timeout=WAIT)
        return pool
    if driver in ("sa-asyncpg", "sa-psycopg"):
        return _sa_engine(driver, app_name, size)
    raise ValueError(driver)


def _sa_engine(driver: str, app_name: str, size: int = POOL_SIZE) -> AsyncEngine:
    if driver == "sa-asyncpg":
        url = DSN.replace("postgresql://", "postgresql+asyncpg://", 1)
        connect_args: dict[str, Any] = {"server_settings": {"application_name": app_name}}
    else:
        url = DSN.replace("postgresql://", "postgresql+psycopg://", 1)
        connect_args = {"application_name": app_name}
    return create_async_engine(
        url, pool_size=size, max_overflow=0, connect_args=connect_args
    )


def _open_sync(app_name: str) -> Any:
    assert psycopg_pool is not None
    pool = psycopg_pool.ConnectionPool(
        DSN,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        kwargs={"autocommit": True, "application_name": app_name},
        open=False,
    )
    pool.open(wait=True, timeout=WAIT)
    return pool


async def _close(obj: Any) -> None:
    if isinstance(obj, AsyncEngine):
        await obj.dispose()
    elif psycopg_pool is not None and isinstance(obj, psycopg_pool.ConnectionPool):
        await asyncio.to_thread(obj.close)
    else:
        await obj.close()


async def _sleep_async(target: Any, driver: str, seconds: float, probe: Probe) -> None:
    """Run ``pg_sleep(seconds)`` through the helper for ``driver``."""
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target) as conn:
            probe.start(conn.get_server_pid())
            await conn.execute(f"SELECT pg_sleep({seconds})")
    elif driver.startswith("psycopg"):
        async with psycopg_transaction(target) as conn:
            probe.start(conn.info.backend_pid)
            await conn.execute("SELECT pg_sleep(%s)", [seconds])
    else:
        factory = async_sessionmaker(target, expire_on_commit=False)
        async with sqlalchemy_session(factory) as session:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            probe.start(pid)
            await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


def _sleep_sync(pool: Any, seconds: float, probe: Probe) -> None:
    with psycopg_transaction_sync(pool) as conn:
        probe.start(conn.info.backend_pid)
        conn.execute("SELECT pg_sleep(%s)", [seconds])


def make_app(prefix: str, timeout: float, probe: Probe, wrap: bool = False) -> Any:
    """A Starlette app with ContextMiddleware(timeout=timeout) as its middleware
    (``wrap``: around the whole app, outside Starlette's error middleware).

    * ``/sleep/{driver}?s=N`` runs ``pg_sleep(N)`` (psycopg-sync-def: in a
      ``def`` endpoint; psycopg-sync-thread: via ``asyncio.to_thread``);
    * ``/stream/{driver}?s=N`` does it inside a ``StreamingResponse`` body,
      after a first chunk;
    * ``/health/{driver}`` reports the pool and runs ``SELECT 1`` on every
      connection it can hold.
    """
    res = Resources(prefix)

    def seconds(request: Request) -> float:
        return float(request.query_params.get("s", "30"))

    async def sleep_async(request: Request) -> PlainTextResponse:
        driver = request.path_params["driver"]
        try:
            if driver == "psycopg-sync-thread":
                pool = await asyncio.to_thread(res.get_sync, driver)
                await asyncio.to_thread(_sleep_sync, pool, seconds(request), probe)
            else:
                target = await res.get(driver)
                await _sleep_async(target, driver, seconds(request), probe)
        except BaseException as exc:
            probe.end(exc)
            raise
        probe.end(None)
        return PlainTextResponse("ok")

    def sleep_sync(request: Request) -> PlainTextResponse:
        pool = res.get_sync(request.path_params["driver"])
        try:
            _sleep_sync(pool, seconds(request), probe)
        except BaseException as exc:
            probe.end(exc)
            raise
        probe.end(None)
        return PlainTextResponse("ok")

    async def sleep(request: Request) -> PlainTextResponse:
        if request.path_params["driver"] == "psycopg-sync-def":
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(sleep_sync, request)
        return await sleep_async(request)

    async def stream(request: Request) -> StreamingResponse:
        driver = request.path_params["driver"]
        s = seconds(request)
        if driver.startswith("psycopg-sync"):
            pool = await asyncio.to_thread(res.get_sync, driver)

            def sync_body() -> Iterator[bytes]:
                try:
                    with psycopg_transaction_sync(pool) as conn:
                        yield b"start\n"
                        probe.start(conn.info.backend_pid)
                        conn.execute("SELECT pg_sleep(%s)", [s])
                        yield b"done\n"
                except BaseException as exc:
                    probe.end(exc)
                    raise
                probe.end(None)

            return StreamingResponse(sync_body())
        target = await res.get(driver)

        async def body() -> AsyncIterator[bytes]:
            try:
                async with _stream_helper(target, driver) as (pid, run):
                    yield b"start\n"
                    probe.start(pid)
                    await run(s)
                    yield b"done\n"
            except BaseException as exc:
                probe.end(exc)
                raise
            probe.end(None)

        return StreamingResponse(body())

    async def reset(request: Request) -> PlainTextResponse:
        await res.reset(request.path_params["driver"])
        return PlainTextResponse("ok")

    async def health(request: Request) -> JSONResponse:
        driver = request.path_params["driver"]
        if driver.startswith("psycopg-sync"):
            pool = await asyncio.to_thread(res.get_sync, driver)
            return JSONResponse(await asyncio.to_thread(_health_sync_pool, pool))
        return JSONResponse(await _health_async(await res.get(driver)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await res.aclose()

    app = Starlette(
        routes=[
            Route("/sleep/{driver}", sleep),
            Route("/stream/{driver}", stream),
            Route("/health/{driver}", health),
            Route("/reset/{driver}", reset),
        ],
        middleware=[] if wrap else [Middleware(ContextMiddleware, timeout=timeout)],
        lifespan=lifespan,
    )
    return ContextMiddleware(app, timeout=timeout) if wrap else app


@contextlib.asynccontextmanager
async def _stream_helper(
    target: Any, driver: str
) -> AsyncIterator[tuple[int, Callable[[float], Any]]]:
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target) as conn:

            async def run_asyncpg(s: float) -> None:
                await conn.execute(f"SELECT pg_sleep({s})")

            yield conn.get_server_pid(), run_asyncpg
    elif driver.startswith("psycopg"):
        async with psycopg_transaction(target) as pconn:

            async def run_psycopg(s: float) -> None:
                await pconn.execute("SELECT pg_sleep(%s)", [s])

            yield pconn.info.backend_pid, run_psycopg
    else:
        factory = async_sessionmaker(target, expire_on_commit=False)
        async with sqlalchemy_session(factory) as session:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()

            async def run_sa(s: float) -> None:
                await session.execute(text("SELECT pg_sleep(:s)"), {"s": s})

            yield pid, run_sa


async def _health_async(obj: Any) -> dict[str, Any]:
    """Checked-out count, and SELECT 1 on every connection the object can hand out."""
    if isinstance(obj, asyncpg.Pool):
        checked_out = obj.get_size() - obj.get_idle_size()
        conns = [await obj.acquire(timeout=WAIT) for _ in range(obj.get_max_size())]
        try:
            ok = [await c.fetchval("SELECT 1") == 1 and not c.is_in_transaction() for c in conns]
        finally:
            for c in conns:
                await obj.release(c)
        return {"checked_out": checked_out, "ok": all(ok), "n": len(ok)}
    if isinstance(obj, asyncpg.Connection):
        ok = not obj.is_closed() and not obj.is_in_transaction()
        ok = ok and await obj.fetchval("SELECT 1") == 1
        return {"checked_out": 0, "ok": ok, "n": 1}
    if psycopg_pool is not None and isinstance(obj, psycopg_pool.AsyncConnectionPool):
        stats = obj.get_stats()
        checked_out = stats["pool_size"] - stats["pool_available"]
        async with contextlib.AsyncExitStack() as stack:
            conns = [
                await stack.enter_async_context(obj.connection(timeout=WAIT))
                for _ in range(obj.max_size)
            ]
            ok = []
            for c in conns:
                idle = c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                row = await (await c.execute("SELECT 1")).fetchone()
                ok.append(idle and row == (1,))
        return {"checked_out": checked_out, "ok": all(ok), "n": len(ok)}
    if isinstance(obj, psycopg.AsyncConnection):
        if obj.closed:
            return {"closed": True}
        idle = obj.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        row = await (await obj.execute("SELECT 1")).fetchone()
        return {"checked_out": 0, "ok": not obj.closed and idle and row == (1,), "n": 1}
    if isinstance(obj, AsyncEngine):
        pool: Any = obj.pool
        checked_out = pool.checkedout()
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(obj.connect()) for _ in range(pool.size())]
            ok = [(await c.execute(text("SELECT 1"))).scalar_one() == 1 for c in conns]
        return {"checked_out": checked_out, "ok": all(ok), "n": len(ok)}
    raise TypeError(type(obj))


def _health_sync_pool(pool: Any) -> dict[str, Any]:
    stats = pool.get_stats()
    checked_out = stats["pool_size"] - stats["pool_available"]
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(pool.connection(timeout=WAIT)) for _ in range(pool.max_size)]
        ok = [
            c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            and c.execute("SELECT 1").fetchone() == (1,)
            for c in conns
        ]
    return {"checked_out": checked_out, "ok": all(ok), "n": len(ok)}


class App:
    """A served app plus what the test needs to drive it."""

    def __init__(self, server: RunningServer, prefix: str, probe: Probe) -> None:
        self.server = server
        self.prefix = prefix
        self.probe = probe

    def app_name(self, driver: str) -> str:
        return f"{self.prefix}-{driver}"

    def max_backends(self, driver: str) -> int:
        return 1 if driver.endswith("-conn") else POOL_SIZE

    def get(self, path: str) -> httpx.Response:
        with httpx.Client(base_url=self.server.url, timeout=WAIT) as client:
            return client.get(path)

    def assert_healthy(self, driver: str, monitor: Monitor) -> None:
        """No backend in a transaction or leaked; the next request succeeds; the
        pool has nothing checked out and every connection answers SELECT 1."""
        monitor.wait_clean(self.app_name(driver), self.max_backends(driver))
        self.probe.reset()
        assert self.get(f"/sleep/{driver}?s=0").text == "ok"
        assert self.probe.wait_ended() is None
        end = time.monotonic() + WAIT
        while True:  # a pool may still be replacing a connection it closed
            report = self.get(f"/health/{driver}").json()
            if report["checked_out"] == 0 and report["ok"]:
                break
            assert time.monotonic() < end, report
            time.sleep(0.01)
        assert report["n"] == self.max_backends(driver)
        monitor.wait_clean(self.app_name(driver), self.max_backends(driver))


@contextlib.contextmanager
def _served(kind: str, tag: str, timeout: float, wrap: bool = False) -> Iterator[App]:
    probe = Probe()
    prefix = f"{APP}-{tag}"
    app = make_app(prefix, timeout, probe, wrap)
    options = {"lifespan": "on"} if kind.startswith("uvicorn") else {}
    with serve(app, kind, **options) as server:
        yield App(server, prefix, probe)


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest) -> Iterator[App]:
    """The app with a 30 s timeout, on each server kind."""
    kind = request.param
    with _served(kind, kind.replace("uvicorn-", "u")[:5], 30.0) as app:
        yield app


@pytest.fixture(scope="module")
def served_h11() -> Iterator[App]:
    with _served("uvicorn-h11", "s", 30.0) as app:
        yield app


@pytest.fixture(scope="module", params=["add_middleware", "wrapped"])
def served_deadline(request: pytest.FixtureRequest) -> Iterator[App]:
    """The app with ContextMiddleware(timeout=0.3): added with add_middleware,
    or wrapped around the whole app (then a helper's DeadlineExceeded crosses
    Starlette's error middleware first)."""
    wrap = request.param == "wrapped"
    with _served("uvicorn-h11", "w" if wrap else "t", 0.3, wrap) as app:
        yield app


def _is_cancellation(exc: BaseException | None) -> bool:
    return isinstance(exc, (ContextError, asyncio.CancelledError))


# -- (1) client disconnect ----------------------------------------------------


@pytest.mark.parametrize("driver", DRIVER_PARAMS)
def test_client_disconnect_stops_query_on_server(
    served: App, monitor: Monitor, driver: str
) -> None:
    probe = served.probe
    probe.reset()
    sock = served.server.connect()
    try:
        sock.sendall(raw_request("GET", f"/sleep/{driver}?s=30"))
        pid = probe.wait_started()
        monitor.wait_active(pid)
        t_close = time.perf_counter()
    finally:
        sock.close()
    t_idle = monitor.wait_not_active(pid)
    exc = probe.wait_ended()
    assert _is_cancellation(exc), repr(exc)
    ms = (t_idle - t_close) * 1000
    print(f"{served.server.server} {driver}: backend idle {ms:.1f} ms after close")
    served.assert_healthy(driver, monitor)


# -- (2) deadline ---------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVER_PARAMS)
def test_deadline_gives_504_and_stops_query_on_server(
    served_deadline: App, monitor: Monitor, driver: str
) -> None:
    app = served_deadline
    app.get(f"/health/{driver}")  # open the pool outside the 0.3 s budget
    app.probe.reset()
    result: dict[str, Any] = {}
    sock = app.server.connect()

    def read() -> None:
        sock.settimeout(WAIT)
        first = sock.recv(65536)
        result["t_response"] = time.perf_counter()
        result["response"] = first + read_response(sock)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        t_send = time.perf_counter()
        sock.sendall(raw_request("GET", f"/sleep/{driver}?s=30", {"Connection": "close"}))
        pid = app.probe.wait_started()
        monitor.wait_active(pid)
        t_idle = monitor.wait_not_active(pid, bound=0.3 + BOUND)
        reader.join(WAIT)
    finally:
        sock.close()
    assert result["response"].startswith(b"HTTP/1.1 504 "), result["response"]
    elapsed = t_idle - t_send
    print(f"{driver}: 504 at {(result['t_response'] - t_send) * 1000:.0f} ms, "
          f"backend idle at {elapsed * 1000:.0f} ms")
    assert 0.28 <= elapsed <= 0.3 + BOUND
    exc = app.probe.wait_ended()
    assert _is_cancellation(exc), repr(exc)
    app.assert_healthy(driver, monitor)


# -- (3) StreamingResponse: Starlette's level-triggered cancellation ----------


def _read_until(sock: Any, marker: bytes) -> bytes:
    sock.settimeout(WAIT)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("driver", DRIVER_PARAMS)
def test_disconnect_mid_stream_stops_query_on_server(
    served_h11: App, monitor: Monitor, driver: str
) -> None:
    app = served_h11
    app.probe.reset()
    sock = app.server.connect()
    try:
        sock.sendall(raw_request("GET", f"/stream/{driver}?s=30"))
        _read_until(sock, b"start")
        pid = app.probe.wait_started()
        monitor.wait_active(pid)
        t_close = time.perf_counter()
    finally:
        sock.close()
    t_idle = monitor.wait_not_active(pid)
    exc = app.probe.wait_ended()
    assert exc is not None, "the stream ran to its end"
    ms = (t_idle - t_close) * 1000
    print(f"stream {driver}: backend idle {ms:.1f} ms after close ({type(exc).__name__})")
    if driver == "psycopg-conn":
        # Known limitation: interrupted again while cancelling (anyio re-cancels
        # at every await), psycopg closes its connection ("query cancellation
        # interrupted"). The query is still stopped, and the backend exits.
        monitor.wait_gone(pid)
        assert app.get(f"/health/{driver}").json() == {"closed": True}
        app.get(f"/reset/{driver}")
    app.assert_healthy(driver, monitor)


def test_stream_completes_when_client_stays(served_h11: App, monitor: Monitor) -> None:
    """The control: nothing is cancelled while the client reads."""
    app = served_h11
    for driver in ("psycopg-conn", "sa-psycopg", "asyncpg-pool"):
        app.probe.reset()
        response = app.get(f"/stream/{driver}?s=0.01")
        assert response.text == "start\ndone\n"
        assert app.probe.wait_ended() is None
        monitor.wait_clean(app.app_name(driver), app.max_backends(driver))


# -- (4) the deadline on the server: SET LOCAL statement_timeout --------------


def _parse_interval_ms(value: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(ms|s|min|h)?", value.strip())
    assert m, value
    return int(m.group(1)) * {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, None: 1}[
        m.group(2)
    ]


async def _show_statement_timeout(driver: str, target: Any, ctx: Any) -> tuple[float, float]:
    """(SHOW statement_timeout in ms, ctx.remaining() in ms right before it)."""
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target, ctx) as conn:
            remaining = ctx.remaining() * 1000
            return _parse_interval_ms(await conn.fetchval("SHOW statement_timeout")), remaining
    if driver.startswith("psycopg"):
        async with psycopg_transaction(target, ctx) as pconn:
            remaining = ctx.remaining() * 1000
            row = await (await pconn.execute("SHOW statement_timeout")).fetchone()
            return _parse_interval_ms(row[0]), remaining
    async with sqlalchemy_session(target, ctx) as session:
        remaining = ctx.remaining() * 1000
        value = (await session.execute(text("SHOW statement_timeout"))).scalar_one()
        return _parse_interval_ms(value), remaining


@contextlib.asynccontextmanager
async def _async_target(driver: str, app_name: str, size: int = POOL_SIZE) -> AsyncIterator[Any]:
    obj = await _open_async(driver, app_name, size)
    try:
        yield obj
    finally:
        await _close(obj)


@pytest.mark.parametrize("driver", [_needs(d) for d in ASYNC_DRIVERS])
def test_statement_timeout_is_the_remaining_time(driver: str) -> None:
    async def main() -> None:
        async with _async_target(driver, f"{APP}-stmt-{driver}") as target:
            # 7.777 s: SHOW prints "7777ms" (or near), not a rounded "8s".
            ctx, cancel = with_timeout(background(), 7.777)
            try:
                shown, remaining = await _show_statement_timeout(driver, target, ctx)
            finally:
                cancel()
            # SHOW is what remained when SET LOCAL was sent, a round trip
            # (or, loaded, a few more) before ``remaining`` was read.
            assert remaining - 100 <= shown <= remaining + 100, (shown, remaining)
            # No deadline: the server default stays.
            if driver.startswith("asyncpg"):
                async with asyncpg_transaction(target, background()) as conn:
                    assert await conn.fetchval("SHOW statement_timeout") == "0"
            # And SET LOCAL ends with the transaction.
            shown_after = await _show_outside(driver, target)
            assert shown_after == "0"

    asyncio.run(main())


async def _show_outside(driver: str, target: Any) -> str:
    if driver.startswith("asyncpg"):
        if isinstance(target, asyncpg.Pool):
            async with target.acquire() as conn:
                return str(await conn.fetchval("SHOW statement_timeout"))
        return str(await target.fetchval("SHOW statement_timeout"))
    if driver.startswith("psycopg"):
        if isinstance(target, psycopg.AsyncConnection):
            row = await (await target.execute("SHOW statement_timeout")).fetchone()
            return str(row[0])
        async with target.connection() as conn:
            row = await (await conn.execute("SHOW statement_timeout")).fetchone()
            return str(row[0])
    async with target.connect() as conn:
        return str((await conn.execute(text("SHOW statement_timeout"))).scalar_one())


POOL_DRIVERS = [_needs(d) for d in ("asyncpg-pool", "psycopg-pool", "sa-asyncpg", "sa-psycopg")]


@contextlib.asynccontextmanager
async def _hold_one(target: Any) -> AsyncIterator[None]:
    """Check out one connection of ``target`` (a pool of one) until the block ends."""
    if isinstance(target, asyncpg.Pool):
        async with target.acquire():
            yield
    elif isinstance(target, AsyncEngine):
        async with target.connect() as conn:
            await conn.execute(text("SELECT 1"))
            yield
    else:
        async with target.connection():
            yield


@pytest.mark.parametrize("driver", POOL_DRIVERS)
def test_statement_timeout_counts_the_wait_for_the_pool(driver: str) -> None:
    """The timeout sent is what remains once a connection is acquired, not before."""

    async def main() -> None:
        async with _async_target(driver, f"{APP}-poolwait-{driver}", size=1) as target:
            ctx, cancel = with_timeout(background(), 5.0)
            try:
                holder = _hold_one(target)
                await holder.__aenter__()
                task = asyncio.create_task(_show_statement_timeout(driver, target, ctx))
                await asyncio.sleep(0.3)  # the helper waits for the pool meanwhile
                assert not task.done()
                await holder.__aexit__(None, None, None)
                shown, remaining = await asyncio.wait_for(task, WAIT)
            finally:
                cancel()
            assert remaining - 100 <= shown <= remaining + 100, (shown, remaining)
            assert shown <= 4700 + 10, shown  # not the 5000 left before the wait

    asyncio.run(main())


@pytest.mark.parametrize("driver", POOL_DRIVERS)
def test_deadline_interrupts_the_wait_for_the_pool(driver: str) -> None:
    async def main() -> None:
        async with _async_target(driver, f"{APP}-poolint-{driver}", size=1) as target:
            async with _hold_one(target):
                ctx, cancel = with_timeout(background(), 0.2)
                t0 = time.perf_counter()
                try:
                    with pytest.raises(DeadlineExceeded):
                        await asyncio.wait_for(
                            _show_statement_timeout(driver, target, ctx), 0.2 + BOUND
                        )
                finally:
                    cancel()
                assert 0.15 <= time.perf_counter() - t0 <= 0.2 + BOUND
            report = await _health_async(target)
            assert report["checked_out"] == 0 and report["ok"] and report["n"] == 1, report

    asyncio.run(main())


@pytest.mark.skipif(psycopg_pool is None, reason="psycopg_pool not installed")
def test_deadline_bounds_the_wait_for_a_sync_pool() -> None:
    assert psycopg_pool is not None
    with psycopg_pool.ConnectionPool(
        DSN,
        min_size=1,
        max_size=1,
        timeout=3 * BOUND,  # the pool's own limit, longer than the bound
        kwargs={"autocommit": True, "application_name": f"{APP}-syncwait"},
    ) as pool, pool.connection():
        ctx, cancel = with_timeout(background(), 0.2)
        t0 = time.perf_counter()
        try:
            with pytest.raises(DeadlineExceeded), psycopg_transaction_sync(pool, ctx):
                raise AssertionError("got a connection from an exhausted pool")
        finally:
            cancel()
        assert 0.15 <= time.perf_counter() - t0 <= 0.2 + BOUND


class _NeverCancels(Context):
    """Delegates to a real context, but its scope() never cancels the task:
    the Python side of the helper does nothing when the deadline passes."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def deadline(self) -> float | None:
        return self._ctx.deadline()

    def done(self) -> Any:
        return self._ctx.done()

    def err(self) -> ContextError | None:
        return self._ctx.err()

    def value(self, key: Any) -> Any:
        return self._ctx.value(key)

    def scope(self) -> Any:
        return contextlib.nullcontext()


@pytest.mark.parametrize("driver", [_needs(d) for d in ASYNC_DRIVERS])
def test_statement_timeout_stops_query_when_python_does_not_cancel(
    driver: str, monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the task nor the out-of-band cancel acts: the server's
    statement_timeout alone ends ``pg_sleep(5)`` at the 200 ms deadline."""
    monkeypatch.setattr(_postgres, "_driver_cancel", lambda conn: lambda: None)
    app_name = f"{APP}-never-{driver}"

    async def main() -> None:
        async with _async_target(driver, app_name) as target:
            await _health_async(target)  # connections open before the clock starts
            probe = Probe()
            real, cancel = with_timeout(background(), 0.2)
            t0 = time.perf_counter()
            try:
                with pytest.raises(DeadlineExceeded) as info:
                    await _run_with(target, driver, _NeverCancels(real), probe, seconds=5)
            finally:
                cancel()
            elapsed = time.perf_counter() - t0
            assert "statement timeout" in str(info.value.__cause__), repr(info.value.__cause__)
            assert 0.15 <= elapsed <= 0.2 + BOUND, elapsed
            state, _ = await asyncio.to_thread(monitor.state, probe.data["pid"])
            assert state in ("idle", None)  # SQLAlchemy may have dropped the connection
            report = await _health_async(target)
            assert report["checked_out"] == 0 and report["ok"], report

    asyncio.run(main())


def test_statement_timeout_stops_query_when_nothing_cancels_psycopg_sync(
    monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sync psycopg with the out-of-band cancel disabled: only the server's
    statement_timeout can stop ``pg_sleep(5)`` under a 200 ms deadline."""
    monkeypatch.setattr(_postgres, "_driver_cancel", lambda conn: lambda: None)
    with psycopg.connect(DSN, autocommit=True, application_name=f"{APP}-stsync") as conn:
        ctx, cancel = with_timeout(background(), 0.2)
        t0 = time.perf_counter()
        try:
            with pytest.raises(DeadlineExceeded) as info, psycopg_transaction_sync(conn, ctx):
                conn.execute("SELECT pg_sleep(5)")
        finally:
            cancel()
        elapsed = time.perf_counter() - t0
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        assert "statement timeout" in str(info.value.__cause__)
        assert 0.15 <= elapsed <= 0.2 + BOUND
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- (5) in process: the same connection is clean after a cancelled query -----


@pytest.mark.parametrize("driver", [_needs(d) for d in ASYNC_DRIVERS])
def test_cancelled_query_leaves_connection_clean(driver: str, monitor: Monitor) -> None:
    app_name = f"{APP}-clean-{driver}"

    async def main() -> None:
        async with _async_target(driver, app_name) as target:
            probe = Probe()
            for _ in range(3):  # the same connection, cancelled again and again
                probe.reset()
                ctx, cancel = with_cancel(background())
                task = asyncio.create_task(_run_with(target, driver, ctx, probe))
                pid = await asyncio.to_thread(probe.wait_started)
                await asyncio.to_thread(monitor.wait_active, pid)
                t0 = time.perf_counter()
                cancel()
                t_idle = await asyncio.to_thread(monitor.wait_not_active, pid)
                with pytest.raises(Canceled):
                    await asyncio.wait_for(task, WAIT)
                assert t_idle - t0 <= BOUND
                await asyncio.to_thread(
                    monitor.wait_clean, app_name, 1 if driver.endswith("-conn") else POOL_SIZE
                )
                report = await _health_async(target)
                assert report["checked_out"] == 0 and report["ok"], report

    asyncio.run(main())


async def _run_with(
    target: Any, driver: str, ctx: Any, probe: Probe, seconds: float = 30
) -> None:
    with bind(ctx):
        await _sleep_async(target, driver, seconds, probe)


@pytest.mark.skipif(psycopg_pool is None, reason="psycopg_pool not installed")
def test_sync_cancel_from_another_thread(monitor: Monitor) -> None:
    """psycopg sync in a worker thread, cancelled from the test thread."""
    assert psycopg_pool is not None
    with psycopg.connect(DSN, autocommit=True, application_name=f"{APP}-sync") as conn:
        probe = Probe()
        for _ in range(3):
            probe.reset()
            ctx, cancel = with_cancel(background())
            errors: list[BaseException] = []

            def work(ctx: Any = ctx, errors: list[BaseException] = errors) -> None:
                try:
                    with psycopg_transaction_sync(conn, ctx) as c:
                        probe.start(c.info.backend_pid)
                        c.execute("SELECT pg_sleep(30)")
                except BaseException as exc:
                    errors.append(exc)

            worker = threading.Thread(target=work)
            worker.start()
            pid = probe.wait_started()
            monitor.wait_active(pid)
            t0 = time.perf_counter()
            cancel()
            t_idle = monitor.wait_not_active(pid)
            worker.join(WAIT)
            assert t_idle - t0 <= BOUND
            assert len(errors) == 1 and isinstance(errors[0], Canceled), errors
            assert isinstance(errors[0].__cause__, psycopg.errors.QueryCanceled)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.execute("SELECT 1").fetchone() == (1,)


# -- transaction edges ----------------------------------------------------------


def test_statement_timeout_rounds_up() -> None:
    """Rounded down, 1.9 ms left would make the server abort after 1 ms: before
    the deadline, while ctx.err() is still None (the driver's error would leak)."""

    class Left(Context):
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def deadline(self) -> float | None:
            return time.monotonic() + self.seconds

        def done(self) -> Any:
            return background().done()

        def err(self) -> ContextError | None:
            return None

        def value(self, key: Any) -> Any:
            return None

        def remaining(self) -> float | None:
            return self.seconds

    assert _guard.statement_timeout_ms(Left(0.0019)) == 2
    assert _guard.statement_timeout_ms(Left(0.0000001)) == 1
    assert _guard.statement_timeout_ms(Left(7.0)) == 7000
    assert _guard.statement_timeout_ms(background()) is None


@pytest.mark.parametrize("driver", [_needs("asyncpg-conn"), _needs("psycopg-conn")])
def test_interrupted_begin_leaves_connection_usable(driver: str, monitor: Monitor) -> None:
    """A task cancelled while its BEGIN is in flight (anyio scopes do that):
    the bare connection must not stay inside that transaction."""
    app_name = f"{APP}-begin-{driver}"
    helper = asyncpg_transaction if driver.startswith("asyncpg") else psycopg_transaction

    async def main() -> None:
        async with _async_target(driver, app_name) as conn:
            for _ in range(3):
                ctx, cancel = with_timeout(background(), 5.0)

                async def use(ctx: Any = ctx) -> None:
                    async with helper(conn, ctx) as c:
                        await c.execute("SELECT 1")

                task = asyncio.create_task(use())
                await asyncio.sleep(0)  # the task now waits for its BEGIN
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                cancel()
                await asyncio.to_thread(monitor.wait_clean, app_name, 1)
                # The next transaction is a real one: its SET LOCAL ends with it.
                ctx, cancel = with_timeout(background(), 5.0)
                async with helper(conn, ctx) as c:
                    await c.execute("SELECT 1")
                cancel()
                assert await _show_outside(driver, conn) == "0"
                report = await _health_async(conn)
                assert report["ok"], report

    asyncio.run(main())


async def _insert(driver: str, target: Any, ctx: Any, cancel: Callable[[], None]) -> None:
    """Insert a row, then cancel ``ctx`` and end the block without awaiting again."""
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target, ctx) as conn:
            await conn.execute("INSERT INTO ctxmw_rows VALUES ($1)", APP)
            cancel()
    elif driver.startswith("psycopg"):
        async with psycopg_transaction(target, ctx) as pconn:
            await pconn.execute("INSERT INTO ctxmw_rows VALUES (%s)", [APP])
            cancel()
    else:
        async with sqlalchemy_session(target, ctx) as session:
            await session.execute(text("INSERT INTO ctxmw_rows VALUES (:v)"), {"v": APP})
            cancel()


@pytest.fixture()
def rows_table() -> Iterator[Callable[[], int]]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ctxmw_rows (tag text)")
        conn.execute("DELETE FROM ctxmw_rows WHERE tag = %s", [APP])

        def count() -> int:
            row = conn.execute("SELECT count(*) FROM ctxmw_rows WHERE tag = %s", [APP]).fetchone()
            assert row is not None
            return int(row[0])

        yield count
        conn.execute("DELETE FROM ctxmw_rows WHERE tag = %s", [APP])


@pytest.mark.parametrize("driver", [_needs(d) for d in ASYNC_DRIVERS])
def test_context_done_when_block_ends_rolls_back(
    driver: str, rows_table: Callable[[], int]
) -> None:
    """Like Go's Tx: a transaction whose context is done is not committed."""

    async def main() -> None:
        async with _async_target(driver, f"{APP}-rb-{driver}") as target:
            ctx, cancel = with_cancel(background())
            with pytest.raises(Canceled):
                await _insert(driver, target, ctx, cancel)
            assert rows_table() == 0
            ctx, cancel = with_cancel(background())
            await _insert(driver, target, ctx, lambda: None)  # control: committed
            cancel()
            assert rows_table() == 1

    asyncio.run(main())


def test_context_done_when_block_ends_rolls_back_sync(rows_table: Callable[[], int]) -> None:
    with psycopg.connect(DSN, autocommit=True, application_name=f"{APP}-rbs") as conn:
        ctx, cancel = with_cancel(background())
        with pytest.raises(Canceled), psycopg_transaction_sync(conn, ctx) as c:
            c.execute("INSERT INTO ctxmw_rows VALUES (%s)", [APP])
            cancel()
        assert rows_table() == 0
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_sync_cancel_between_statements_cancels_the_next_one(monitor: Monitor) -> None:
    """Cancelled while the worker runs Python code between two statements (the
    cancel request then finds nothing to cancel): the next statement must not
    run to its end either. No deadline here, so no statement_timeout."""
    with psycopg.connect(DSN, autocommit=True, application_name=f"{APP}-gap") as conn:
        ctx, cancel = with_cancel(background())
        between = threading.Event()
        go_on = threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with psycopg_transaction_sync(conn, ctx) as c:
                    c.execute("SELECT 1")
                    between.set()
                    assert go_on.wait(WAIT)  # "Python work" while the context is cancelled
                    c.execute("SELECT pg_sleep(30)")
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=work)
        worker.start()
        assert between.wait(WAIT)
        cancel()
        time.sleep(0.05)  # let the first cancel request pass while nothing runs
        go_on.set()
        pid = conn.info.backend_pid
        t0 = time.perf_counter()
        worker.join(BOUND)
        if worker.is_alive():
            conn.cancel()  # unstick it, then fail
            worker.join(WAIT)
            pytest.fail("the statement after the cancellation was not cancelled")
        print(f"cancelled {(time.perf_counter() - t0) * 1000:.1f} ms after it could start")
        assert len(errors) == 1 and isinstance(errors[0], Canceled), errors
        assert monitor.state(pid)[0] == "idle"
        assert conn.execute("SELECT 1").fetchone() == (1,)


SLOW_COMMIT = f"ctxmw_slow_commit_{os.getpid()}"


@pytest.fixture()
def slow_commit_table() -> Iterator[str]:
    """A table whose COMMIT takes 300 ms (a deferred constraint trigger sleeps),
    like a COMMIT waiting for a synchronous standby."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {SLOW_COMMIT} (tag text)")
        conn.execute(
            f"CREATE OR REPLACE FUNCTION {SLOW_COMMIT}_fn() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$"
        )
        conn.execute(f"DROP TRIGGER IF EXISTS {SLOW_COMMIT}_trg ON {SLOW_COMMIT}")
        conn.execute(
            f"CREATE CONSTRAINT TRIGGER {SLOW_COMMIT}_trg AFTER INSERT ON {SLOW_COMMIT}"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
            f" EXECUTE FUNCTION {SLOW_COMMIT}_fn()"
        )
        try:
            yield SLOW_COMMIT
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {SLOW_COMMIT}")
            conn.execute(f"DROP FUNCTION IF EXISTS {SLOW_COMMIT}_fn()")


async def _insert_slow_commit(driver: str, target: Any, ctx: Any, table: str) -> None:
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target, ctx) as conn:
            await conn.execute(f"INSERT INTO {table} VALUES ('x')")
    elif driver.startswith("psycopg"):
        async with psycopg_transaction(target, ctx) as pconn:
            await pconn.execute(f"INSERT INTO {table} VALUES ('x')")
    else:
        async with sqlalchemy_session(target, ctx) as session:
            await session.execute(text(f"INSERT INTO {table} VALUES ('x')"))


@pytest.mark.parametrize("driver", [_needs(d) for d in ASYNC_DRIVERS])
def test_commit_in_progress_at_the_deadline_completes(
    driver: str, slow_commit_table: str, monitor: Monitor
) -> None:
    """The block ends in time, but its COMMIT (300 ms) outlasts the 150 ms
    deadline. Like Go's database/sql, a COMMIT in progress is not interrupted
    (PostgreSQL's statement_timeout does not cut it either): it completes and
    is reported as a success, and the connection is clean."""
    app_name = f"{APP}-slowcommit-{driver}"

    async def main() -> None:
        async with _async_target(driver, app_name) as target:
            for _ in range(2):
                ctx, cancel = with_timeout(background(), 0.15)
                t0 = time.perf_counter()
                try:
                    await _insert_slow_commit(driver, target, ctx, slow_commit_table)
                finally:
                    cancel()
                assert time.perf_counter() - t0 >= 0.3  # it did outlast the deadline
                await asyncio.to_thread(
                    monitor.wait_clean, app_name, 1 if driver.endswith("-conn") else POOL_SIZE
                )
                report = await _health_async(target)
                assert report["checked_out"] == 0 and report["ok"], report
                assert await _show_outside(driver, target) == "0"
            count = await asyncio.to_thread(
                lambda: monitor.conn.execute(f"SELECT count(*) FROM {slow_commit_table}").fetchone()
            )
            assert count == (2,)

    asyncio.run(main())


def test_commit_in_progress_at_the_deadline_completes_sync(slow_commit_table: str) -> None:
    with psycopg.connect(DSN, autocommit=True, application_name=f"{APP}-slowcommit-s") as conn:
        ctx, cancel = with_timeout(background(), 0.15)
        try:
            with psycopg_transaction_sync(conn, ctx) as c:
                c.execute(f"INSERT INTO {slow_commit_table} VALUES ('x')")
        finally:
            cancel()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert conn.execute(f"SELECT count(*) FROM {slow_commit_table}").fetchone() == (1,)


def test_failed_rollback_is_retried_asyncpg(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    """Seen under load: the query is cancelled by the helper and by the server's
    statement_timeout at once, and the ROLLBACK that follows fails with the
    stale "statement timeout" error without running. asyncpg has already
    forgotten the transaction, so a bare connection would stay inside it (the
    next transaction() raises "manually started transaction"). Reproduced
    here by failing the first ROLLBACK that way."""
    real_execute = asyncpg.connection.Connection.execute
    fail = {"next": False}

    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if fail["next"] and query.strip().upper().startswith("ROLLBACK"):
            fail["next"] = False
            raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")
        return await real_execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", execute)
    app_name = f"{APP}-rbretry"

    async def main() -> None:
        async with _async_target("asyncpg-conn", app_name) as conn:
            for _ in range(2):
                ctx, cancel = with_timeout(background(), 5.0)
                fail["next"] = True
                with pytest.raises(asyncpg.QueryCanceledError):
                    async with asyncpg_transaction(conn, ctx):
                        raise ValueError("the block fails: the helper rolls back")
                cancel()
                assert not fail["next"], "the ROLLBACK was not attempted"
                assert not conn.is_in_transaction()
                async with asyncpg_transaction(conn, background()) as c:
                    assert await c.fetchval("SELECT 1") == 1
                assert await _show_outside("asyncpg-conn", conn) == "0"
            await asyncio.to_thread(monitor.wait_clean, app_name, 1)

    asyncio.run(main())


@pytest.mark.parametrize("flavour", ["async", "sync"])
def test_failed_rollback_is_retried_psycopg(
    flavour: str, monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    """The same race with psycopg (found by the 1,000-request storm in CI): psycopg
    logs "error ignored in rollback" and lets the block's error through, so the
    helper never saw the failure and the connection stayed in the aborted
    transaction (the next transaction() became a SAVEPOINT and failed with
    InFailedSqlTransaction). Reproduced by failing the first ROLLBACK that way."""
    cls = psycopg.AsyncConnection if flavour == "async" else psycopg.Connection
    real_exec = cls._exec_command
    fail = {"next": False}

    def exec_command(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        if fail["next"] and bytes(command).strip().upper() == b"ROLLBACK":
            fail["next"] = False
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return (yield from real_exec(self, command, *args, **kwargs))

    monkeypatch.setattr(cls, "_exec_command", exec_command)
    app_name = f"{APP}-rbretry-{flavour}"
    idle = psycopg.pq.TransactionStatus.IDLE

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(
            DSN, autocommit=True, application_name=app_name
        )
        try:
            for _ in range(2):
                ctx, cancel = with_timeout(background(), 5.0)
                fail["next"] = True
                with pytest.raises(ValueError):
                    async with psycopg_transaction(conn, ctx):
                        raise ValueError("the block fails: the helper rolls back")
                cancel()
                assert not fail["next"], "the ROLLBACK was not attempted"
                assert conn.info.transaction_status == idle
                async with psycopg_transaction(conn, background()) as c:
                    assert await (await c.execute("SELECT 1")).fetchone() == (1,)
                assert await _show_outside("psycopg-conn", conn) == "0"
            await asyncio.to_thread(monitor.wait_clean, app_name, 1)
        finally:
            await conn.close()

    if flavour == "async":
        asyncio.run(main())
        return
    with psycopg.connect(DSN, autocommit=True, application_name=app_name) as conn:
        for _ in range(2):
            ctx, cancel = with_timeout(background(), 5.0)
            fail["next"] = True
            with pytest.raises(ValueError), psycopg_transaction_sync(conn, ctx):
                raise ValueError("the block fails: the helper rolls back")
            cancel()
            assert not fail["next"], "the ROLLBACK was not attempted"
            assert conn.info.transaction_status == idle
            with psycopg_transaction_sync(conn, background()) as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
        monitor.wait_clean(app_name, 1)


# -- fail fast ------------------------------------------------------------------


class _Untouchable:
    """Fails the test if a helper touches it (it would, to send a query)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the helper used the connection ({name}) with a done context")


def _done_contexts() -> list[tuple[Any, type[ContextError]]]:
    cancelled, cancel = with_cancel(background())
    cancel()
    expired, _ = with_timeout(background(), -1)
    return [(cancelled, Canceled), (expired, DeadlineExceeded)]


def test_done_context_fails_fast_before_any_query() -> None:
    async def main() -> None:
        for ctx, err in _done_contexts():
            for helper in (asyncpg_transaction, psycopg_transaction, sqlalchemy_session):
                with pytest.raises(err) as info:
                    async with helper(_Untouchable(), ctx):
                        raise AssertionError("the block ran")
                assert info.value is ctx.err()

    asyncio.run(main())
    for ctx, err in _done_contexts():
        with pytest.raises(err), psycopg_transaction_sync(_Untouchable(), ctx):
            raise AssertionError("the block ran")


def test_done_context_sends_nothing_to_a_real_connection(monitor: Monitor) -> None:
    """Same with a real connection: its backend never sees a statement."""
    with psycopg.connect(DSN, autocommit=True, application_name=f"{APP}-ff") as conn:
        conn.execute("SELECT 'marker-before'")
        ctx, cancel = with_cancel(background())
        cancel()
        with pytest.raises(Canceled), psycopg_transaction_sync(conn, ctx):
            conn.execute("SELECT 'marker-inside'")
        _, query = monitor.state(conn.info.backend_pid)
        assert "marker-before" in query
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


# -- (6) pool health after 1,000 randomly cancelled requests ------------------


async def _storm(
    run_one: Callable[[Any, int], Any], n: int, concurrency: int, seed: int
) -> dict[str, int]:
    """``n`` requests, half with a random 0-20 ms deadline, ``concurrency`` at a
    time; worker ``w`` (0 <= w < concurrency) runs ``run_one(ctx, w)``."""
    rng = random.Random(seed)
    counts = {"ok": 0, "deadline": 0}
    todo = iter(range(n))

    async def worker(w: int) -> None:
        for _ in todo:
            if rng.random() < 0.5:
                ctx, cancel = with_timeout(background(), rng.uniform(0.0, 0.02))
            else:
                ctx, cancel = with_cancel(background())
            try:
                await run_one(ctx, w)
                counts["ok"] += 1
            except DeadlineExceeded:
                counts["deadline"] += 1
            finally:
                cancel()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return counts


QUERIES = ["SELECT pg_sleep(0.005)", "SELECT 1", "SELECT pg_sleep(0.001)"]
STORM = ["asyncpg-pool", "psycopg-pool", "asyncpg-conn", "psycopg-conn"]


@pytest.mark.parametrize("driver", [_needs(d) for d in STORM])
def test_pool_health_after_1000_randomly_cancelled_requests(
    driver: str, monitor: Monitor
) -> None:
    """20 workers over a pool of 10 (waits for the pool get cancelled too), or
    10 workers each on its own connection (-conn: the same connection is
    cancelled about 50 times)."""
    app_name = f"{APP}-storm-{driver}"
    size = 10
    workers = 20 if driver.endswith("-pool") else size
    rng = random.Random(7)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if driver.endswith("-pool"):
                pool = await _open_async(driver, app_name, size)
                stack.push_async_callback(_close, pool)
                targets = [pool] * workers
            else:
                targets = []
                for _ in range(workers):
                    conn = await _open_async(driver, app_name)
                    stack.push_async_callback(_close, conn)
                    targets.append(conn)
            helper = asyncpg_transaction if driver.startswith("asyncpg") else psycopg_transaction

            async def run_one(ctx: Any, w: int) -> None:
                async with helper(targets[w], ctx) as conn:
                    await conn.execute(rng.choice(QUERIES))
                    await conn.execute(rng.choice(QUERIES))

            t0 = time.perf_counter()
            counts = await _storm(run_one, 1000, workers, seed=11)
            elapsed = time.perf_counter() - t0
            print(f"{driver}: {counts} in {elapsed:.2f}s")
            assert counts["ok"] > 100 and counts["deadline"] > 100, counts
            await asyncio.to_thread(monitor.wait_clean, app_name, size)
            for target in dict.fromkeys(targets):  # each pool or connection once
                end = time.monotonic() + WAIT
                while True:  # psycopg_pool replaces closed connections in the background
                    report = await _health_async(target)
                    if report["checked_out"] == 0 and report["ok"]:
                        break
                    assert time.monotonic() < end, report
                    await asyncio.sleep(0.01)
            assert len(await asyncio.to_thread(monitor.backends, app_name)) == size
            await asyncio.to_thread(monitor.wait_clean, app_name, size)

    asyncio.run(main())
