"""Under the middleware, a DB helper raises ``ctx.err()``, never a bare ``CancelledError``.

Issue 9, point 1: whichever fires first, the middleware's cancellation or the
helper's own scope (or PostgreSQL's ``statement_timeout``, set from the
remaining budget), the handler sees ``DeadlineExceeded`` on a deadline and
``Canceled`` with cause ``ClientDisconnected`` on a disconnect. Each helper
(asyncpg connection and pool, psycopg connection and pool, SQLAlchemy over
asyncpg and psycopg) runs many times on a real server (uvicorn, asyncio loop)
against a real PostgreSQL, in the windows where a cancellation used to escape
the helper's error conversion:

* ``deadline``: the budget header passes during ``pg_sleep``;
* ``stall``: the event loop is blocked across the deadline, so PostgreSQL's
  ``statement_timeout`` answers first, and the middleware's cancellation
  lands during the ROLLBACK that follows;
* ``begin``: the client disconnects while the loop is blocked before the
  helper: the cancellation lands while BEGIN (or the pool's acquire) is in
  flight.

Needs PostgreSQL at ``$CTXMIDDLEWARE_PG_DSN`` (skipped when unreachable, failed
under ``CI=true``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest
from servers import serve

asyncpg = pytest.importorskip("asyncpg")
psycopg = pytest.importorskip("psycopg")
sqlalchemy = pytest.importorskip("sqlalchemy")
psycopg_pool = pytest.importorskip("psycopg_pool")

import httpx  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.sql import text  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

import ctxmiddleware  # noqa: E402
from ctxmiddleware import (  # noqa: E402
    Canceled,
    ClientDisconnected,
    ContextMiddleware,
    DeadlineExceeded,
    cause,
    current,
)

DSN = os.environ.get("CTXMIDDLEWARE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DRIVERS = [
    "asyncpg-conn", "asyncpg-pool", "psycopg-conn", "psycopg-pool", "sa-asyncpg", "sa-psycopg"
]
RUNS = 12
BUDGET_MS = 120

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def postgres() -> None:
    try:
        with psycopg.connect(DSN, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL not reachable at {DSN}: {exc}".strip()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


async def _open(driver: str) -> Any:
    if driver == "asyncpg-conn":
        return await asyncpg.connect(DSN)
    if driver == "asyncpg-pool":
        return await asyncpg.create_pool(DSN, min_size=1, max_size=2)
    if driver == "psycopg-conn":
        return await psycopg.AsyncConnection.connect(DSN, autocommit=True)
    if driver == "psycopg-pool":
        pool = psycopg_pool.AsyncConnectionPool(
            DSN, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        )
        await pool.open(wait=True, timeout=5)
        return pool
    scheme = "postgresql+asyncpg://" if driver == "sa-asyncpg" else "postgresql+psycopg://"
    engine = create_async_engine(DSN.replace("postgresql://", scheme, 1), pool_size=2)
    return async_sessionmaker(engine, expire_on_commit=False)


async def _close(obj: Any) -> None:
    if isinstance(obj, async_sessionmaker):
        await obj.kw["bind"].dispose()
    else:
        await obj.close()


async def _run(driver: str, target: Any, stall_at: float | None) -> None:
    """pg_sleep(5) through the helper; with ``stall_at``, block the loop for 0.2 s
    from that many seconds after the query is sent (across the deadline)."""
    loop = asyncio.get_running_loop()

    def stall() -> None:
        if stall_at is not None:
            loop.call_later(stall_at, time.sleep, 0.2)

    if driver.startswith("asyncpg"):
        async with ctxmiddleware.asyncpg_transaction(target) as conn:
            stall()
            await conn.execute("SELECT pg_sleep(5)")
    elif driver.startswith("psycopg"):
        async with ctxmiddleware.psycopg_transaction(target) as conn:
            stall()
            await conn.execute("SELECT pg_sleep(5)")
    else:
        async with ctxmiddleware.sqlalchemy_session(target) as session:
            stall()
            await session.execute(text("SELECT pg_sleep(5)"))


class App:
    """The app under test and what each request's handler saw (by request id)."""

    def __init__(self) -> None:
        self.targets: dict[str, Any] = {}
        self.seen: dict[str, tuple[type[BaseException], type[BaseException] | None]] = {}
        self.done: dict[str, threading.Event] = {}

        async def open_(request: Request) -> PlainTextResponse:
            driver = request.path_params["driver"]
            if driver not in self.targets:
                self.targets[driver] = await _open(driver)
            return PlainTextResponse("ok")

        async def close(request: Request) -> PlainTextResponse:
            for obj in self.targets.values():
                await _close(obj)
            self.targets.clear()
            return PlainTextResponse("ok")

        async def query(request: Request) -> PlainTextResponse:
            driver, mode = request.path_params["driver"], request.path_params["mode"]
            rid = request.headers["x-request-id"]
            target = self.targets[driver]
            if mode == "begin":
                time.sleep(0.1)  # the client disconnects meanwhile
            try:
                await _run(driver, target, BUDGET_MS / 1000 - 0.05 if mode == "stall" else None)
            except BaseException as exc:
                why = cause(current())
                self.seen[rid] = (type(exc), None if why is None else type(why))
                raise
            finally:
                self.done[rid].set()
            self.seen[rid] = (type(None), None)  # type: ignore[assignment]
            return PlainTextResponse("ok")

        self.asgi = ContextMiddleware(
            Starlette(
                routes=[
                    Route("/open/{driver}", open_),
                    Route("/close", close),
                    Route("/q/{driver}/{mode}", query),
                ]
            ),
            timeout=30,
        )


@pytest.fixture(scope="module")
def running() -> Any:
    app = App()
    with serve(app.asgi, "uvicorn-httptools") as server:
        yield app, server
        httpx.get(f"{server.url}/close", timeout=10)


@pytest.mark.parametrize("mode", ["deadline", "stall", "begin"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_handler_sees_ctx_err_never_bare_cancelled_error(
    running: Any, driver: str, mode: str
) -> None:
    app, server = running
    assert httpx.get(f"{server.url}/open/{driver}", timeout=10).status_code == 200
    seen = []
    for i in range(RUNS):
        rid = f"{driver}-{mode}-{i}"
        app.done[rid] = threading.Event()
        if mode == "begin":
            with server.connect() as sock:
                sock.sendall(
                    f"GET /q/{driver}/{mode} HTTP/1.1\r\nhost: t\r\nx-request-id: {rid}\r\n\r\n"
                    .encode()
                )
                time.sleep(0.03)
        else:
            r = httpx.get(
                f"{server.url}/q/{driver}/{mode}",
                headers={"x-request-timeout-ms": str(BUDGET_MS), "x-request-id": rid},
                timeout=10,
            )
            assert r.status_code == 504, r.text
        assert app.done[rid].wait(10), f"{rid}: the handler never ended"
        seen.append(app.seen[rid])
    if mode == "begin":
        expected = (Canceled, ClientDisconnected)
    else:
        expected = (DeadlineExceeded, DeadlineExceeded)
    wrong = [s for s in seen if s != expected]
    assert not wrong, f"{len(wrong)} of {RUNS} saw {wrong[:3]} instead of {expected}"
