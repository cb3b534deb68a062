"""Issue 13, defect 5: a COMMIT that completes is never reported as a failure.

A COMMIT is not interrupted (it cannot be undone halfway). When the deadline
fires while it runs, the task that awaits it is cancelled (by ``ctx.scope()``
or by ContextMiddleware); that cancellation used to be raised as soon as the
COMMIT returned, so the helper raised ``DeadlineExceeded`` for a transaction
that had committed, and the handler could not tell it from a rolled-back one.

The rule the helpers now keep (their docstrings, the README's database
section): **if the helper returned, the transaction committed; if it raised
``ctx.err()``, it rolled back.** A cancellation that lands during the COMMIT
is delivered again at the task's next suspension after the helper returns,
so the deadline still interrupts whatever the handler does next.

COMMIT is made slow deterministically: a deferred constraint trigger sleeps
300 ms at COMMIT time; the deadline (150 ms) falls inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

asyncpg = pytest.importorskip("asyncpg")
psycopg = pytest.importorskip("psycopg")
pytest.importorskip("sqlalchemy")

import httpx  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402
from sqlalchemy.sql import text  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from ctxmiddleware import (  # noqa: E402
    ContextMiddleware,
    DeadlineExceeded,
    asyncpg_transaction,
    background,
    psycopg_transaction,
    psycopg_transaction_sync,
    sqlalchemy_session,
    with_timeout,
)

try:
    import psycopg_pool
except ImportError:  # optional: the pool variants are skipped
    psycopg_pool = None

DSN = os.environ.get("CTXMIDDLEWARE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TABLE = f"ctxmw_commit_outcome_{os.getpid()}"
COMMIT_SLEEP = 0.3
DEADLINE = 0.15

pytestmark = pytest.mark.timeout(60)

DRIVERS = [
    "asyncpg-conn", "asyncpg-pool", "psycopg-conn", "psycopg-pool", "sa-asyncpg", "sa-psycopg"
]


@pytest.fixture(scope="module", autouse=True)
def slow_commit_table() -> Iterator[None]:
    """Skip without PostgreSQL (fail on CI); a table whose COMMIT takes 300 ms."""
    try:
        conn = psycopg.connect(DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL not reachable at {DSN}: {exc}".strip()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    with conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (tag text)")
        conn.execute(
            f"CREATE OR REPLACE FUNCTION {TABLE}_fn() RETURNS trigger LANGUAGE plpgsql"
            f" AS $$ BEGIN PERFORM pg_sleep({COMMIT_SLEEP}); RETURN NULL; END $$"
        )
        conn.execute(f"DROP TRIGGER IF EXISTS {TABLE}_trg ON {TABLE}")
        conn.execute(
            f"CREATE CONSTRAINT TRIGGER {TABLE}_trg AFTER INSERT ON {TABLE}"
            f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {TABLE}_fn()"
        )
        try:
            yield
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(f"DROP FUNCTION IF EXISTS {TABLE}_fn()")


def _rows(tag: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE tag = %s", [tag]).fetchone()
        assert row is not None
        return int(row[0])


def _sa_engine(driver: str) -> AsyncEngine:
    scheme = "postgresql+asyncpg://" if driver == "sa-asyncpg" else "postgresql+psycopg://"
    return create_async_engine(DSN.replace("postgresql://", scheme, 1), pool_size=2)


@contextlib.asynccontextmanager
async def _target(driver: str) -> AsyncIterator[Any]:
    if driver == "asyncpg-conn":
        conn = await asyncpg.connect(DSN)
        try:
            yield conn
        finally:
            await conn.close()
    elif driver == "asyncpg-pool":
        pool = await asyncpg.create_pool(DSN, min_size=1, max_size=2)
        try:
            yield pool
        finally:
            await pool.close()
    elif driver == "psycopg-conn":
        aconn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
        try:
            yield aconn
        finally:
            await aconn.close()
    elif driver == "psycopg-pool":
        if psycopg_pool is None:
            pytest.skip("psycopg_pool not installed")
        apool = psycopg_pool.AsyncConnectionPool(
            DSN, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        )
        await apool.open(wait=True, timeout=5)
        try:
            yield apool
        finally:
            await apool.close()
    else:
        engine = _sa_engine(driver)
        try:
            yield engine
        finally:
            await engine.dispose()


async def _insert(driver: str, target: Any, ctx: Any, tag: str) -> None:
    """One INSERT in the driver's helper; returns when the helper returns."""
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target, ctx) as conn:
            await conn.execute(f"INSERT INTO {TABLE} VALUES ($1)", tag)
    elif driver.startswith("psycopg"):
        async with psycopg_transaction(target, ctx) as pconn:
            await pconn.execute(f"INSERT INTO {TABLE} VALUES (%s)", [tag])
    else:
        async with sqlalchemy_session(target, ctx) as session:
            await session.execute(text(f"INSERT INTO {TABLE} VALUES (:t)"), {"t": tag})


@pytest.mark.parametrize("driver", DRIVERS)
def test_deadline_during_commit_under_a_scope(driver: str) -> None:
    """Under ``ctx.scope()`` (what the middleware does for every request) the
    deadline cancels the task during the COMMIT: the helper must return (the
    row is there), and the deadline must still stop what comes next."""
    tag = f"{driver}-{os.getpid()}-scope"

    async def main() -> None:
        async with _target(driver) as target:
            ctx, cancel = with_timeout(background(), DEADLINE)
            outcome: list[str] = []
            t0 = time.perf_counter()
            try:
                with pytest.raises(DeadlineExceeded):
                    async with ctx.scope():
                        try:
                            await _insert(driver, target, ctx, tag)
                        except BaseException as exc:
                            outcome.append(f"helper raised {exc!r}")
                            raise
                        outcome.append("helper returned")
                        await asyncio.sleep(5)  # the deadline still interrupts this
                        outcome.append("not interrupted")
            finally:
                cancel()
            elapsed = time.perf_counter() - t0
            assert elapsed >= COMMIT_SLEEP, elapsed  # the COMMIT did outlast the deadline
            assert elapsed < 2, elapsed  # and the sleep after it was cut short
            assert outcome == ["helper returned"], outcome
            assert await asyncio.to_thread(_rows, tag) == 1
            # The connection is usable and out of any transaction.
            ctx2, cancel2 = with_timeout(background(), 5)
            try:
                await _insert(driver, target, ctx2, tag + "-after")
            finally:
                cancel2()
            assert await asyncio.to_thread(_rows, tag + "-after") == 1

    asyncio.run(main())


@pytest.mark.parametrize("driver", ["asyncpg-pool", "psycopg-pool", "sa-asyncpg"])
def test_deadline_during_commit_under_the_middleware(driver: str) -> None:
    """End to end in process: the handler learns that the helper returned,
    the row is present, and nothing reports the committed write as failed
    inside the handler. The response is 200 (the handler answered without
    awaiting again) or 504 (the deadline landed first); never a 500."""
    tag = f"{driver}-{os.getpid()}-mw"

    async def main() -> None:
        async with _target(driver) as target:
            seen: list[str] = []

            async def insert(request: Request) -> PlainTextResponse:
                try:
                    await _insert(driver, target, None, tag)
                except BaseException as exc:
                    seen.append(f"helper raised {exc!r}")
                    raise
                seen.append("helper returned")
                return PlainTextResponse("committed")

            app = ContextMiddleware(
                Starlette(routes=[Route("/insert", insert, methods=["POST"])]),
                timeout=DEADLINE,
            )
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post("/insert")
            assert seen == ["helper returned"], seen
            assert r.status_code in (200, 504), r.status_code
            assert await asyncio.to_thread(_rows, tag) == 1

    asyncio.run(main())


def test_deadline_during_commit_sync() -> None:
    """The sync helper (worker threads): nothing cancels the thread, the
    COMMIT completes and the helper returns."""
    tag = f"sync-{os.getpid()}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        ctx, cancel = with_timeout(background(), DEADLINE)
        t0 = time.perf_counter()
        try:
            with psycopg_transaction_sync(conn, ctx) as c:
                c.execute(f"INSERT INTO {TABLE} VALUES (%s)", [tag])
        finally:
            cancel()
        assert time.perf_counter() - t0 >= COMMIT_SLEEP
        assert ctx.err() is not None
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _rows(tag) == 1


# -- the deadline lands while the helper hands the connection back to the pool ---
#
# A finding of the chaos soak (bench/chaos.py, "commit-outcome"): after a
# COMMIT that succeeded, the pool release (asyncpg's reset, psycopg_pool's
# putconn, SQLAlchemy's session close) was interruptible, and a deadline
# landing there made the helper raise DeadlineExceeded for a committed row
# (about 1 in 1,000 chaos requests). The release is made slow
# deterministically (300 ms); the COMMIT itself is fast; the deadline
# (150 ms) falls inside the release.

RELEASE_SLEEP = 0.3
RELEASE_TABLE = f"ctxmw_release_{os.getpid()}"
RELEASE_DRIVERS = [
    "asyncpg-pool-reset",  # asyncpg's Pool(reset=...): awaited by the release
    "psycopg-pool-putconn",  # psycopg_pool's putconn itself slow (in the caller's task)
    "psycopg-pool-reset",  # psycopg_pool's reset=: runs in the pool's worker
    "sa-asyncpg-close",  # the AsyncSession's close (after the COMMIT checked in)
    "sa-psycopg-close",
    "sa-asyncpg-reset",  # the pool's reset event: inside the COMMIT, already covered
]


@pytest.fixture(scope="module")
def release_table() -> Iterator[None]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {RELEASE_TABLE} (tag text)")
        try:
            yield
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {RELEASE_TABLE}")


def _release_rows(tag: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {RELEASE_TABLE} WHERE tag = %s", [tag]
        ).fetchone()
        assert row is not None
        return int(row[0])


def _sessions(app: str) -> list[str]:
    """The states of the PostgreSQL sessions whose application_name is ``app``."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = %s",
            [app],
        ).fetchall()
        return [str(r[0]) for r in rows]


def _pids(app: str) -> list[int]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app]
        ).fetchall()
        return [int(r[0]) for r in rows]


async def _slow() -> None:
    await asyncio.sleep(RELEASE_SLEEP)


@contextlib.asynccontextmanager
async def _slow_release_target(
    driver: str, app: str, sleep: Callable[[], Awaitable[None]] = _slow
) -> AsyncIterator[tuple[Any, Callable[[], Awaitable[bool]]]]:
    """The driver's pool (or session factory) whose release after a COMMIT
    takes ``sleep()``, and a check that all its connections are back in it."""
    if driver == "asyncpg-pool-reset":

        async def reset(conn: object) -> None:
            await sleep()

        pool = await asyncpg.create_pool(
            DSN, min_size=1, max_size=1, reset=reset, server_settings={"application_name": app}
        )

        async def asyncpg_back() -> bool:
            return bool(pool.get_idle_size() == pool.get_size() == 1)

        try:
            yield pool, asyncpg_back
        finally:
            await pool.close()
    elif driver.startswith("psycopg-pool"):
        if psycopg_pool is None:
            pytest.skip("psycopg_pool not installed")
        kwargs: dict[str, Any] = {}
        pool_class: Any = psycopg_pool.AsyncConnectionPool
        if driver == "psycopg-pool-reset":

            async def preset(conn: object) -> None:
                await sleep()

            kwargs["reset"] = preset
        else:

            class SlowPutconn(psycopg_pool.AsyncConnectionPool):  # type: ignore[misc]
                async def putconn(self, conn: Any) -> None:
                    await sleep()  # like a contended pool lock, or closing an expired one
                    await super().putconn(conn)

            pool_class = SlowPutconn
        apool = pool_class(
            DSN, min_size=1, max_size=1, open=False,
            kwargs={"autocommit": True, "application_name": app}, **kwargs,
        )
        await apool.open(wait=True, timeout=5)

        async def psycopg_back() -> bool:
            stats = apool.get_stats()
            return bool(stats.get("pool_available") == stats.get("pool_size") == 1)

        try:
            yield apool, psycopg_back
        finally:
            await apool.close()
    else:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
        from sqlalchemy.util import await_only

        scheme = "postgresql+asyncpg://" if "asyncpg" in driver else "postgresql+psycopg://"
        connect_args: dict[str, Any] = (
            {"server_settings": {"application_name": app}}
            if "asyncpg" in driver
            else {"application_name": app}
        )
        engine = create_async_engine(
            DSN.replace("postgresql://", scheme, 1),
            pool_size=1, max_overflow=0, connect_args=connect_args,
        )
        session_class: type[AsyncSession] = AsyncSession
        if driver.endswith("-reset"):

            @event.listens_for(engine.sync_engine, "reset")
            def slow_reset(*args: object) -> None:
                await_only(sleep())
        else:

            class SlowClose(AsyncSession):
                async def close(self) -> None:
                    await sleep()
                    await super().close()

            session_class = SlowClose

        async def sa_back() -> bool:
            return bool(engine.pool.checkedout() == 0)  # type: ignore[attr-defined]

        try:
            yield async_sessionmaker(engine, class_=session_class), sa_back
        finally:
            await engine.dispose()


async def _insert_released(driver: str, target: Any, ctx: Any, tag: str) -> None:
    if driver.startswith("asyncpg"):
        async with asyncpg_transaction(target, ctx) as conn:
            await conn.execute(f"INSERT INTO {RELEASE_TABLE} VALUES ($1)", tag)
    elif driver.startswith("psycopg"):
        async with psycopg_transaction(target, ctx) as pconn:
            await pconn.execute(f"INSERT INTO {RELEASE_TABLE} VALUES (%s)", [tag])
    else:
        async with sqlalchemy_session(target, ctx) as session:
            await session.execute(text(f"INSERT INTO {RELEASE_TABLE} VALUES (:t)"), {"t": tag})


async def _until(check: Callable[[], Awaitable[bool]], within: float = 3.0) -> bool:
    end = time.monotonic() + within
    while not await check():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.mark.usefixtures("release_table")
@pytest.mark.parametrize("driver", RELEASE_DRIVERS)
def test_deadline_during_the_pool_release_after_commit(driver: str) -> None:
    """The helper returns (the row is there), the handler's next await raises
    DeadlineExceeded, the connection is back in the pool, nothing is left
    ``idle in transaction``, and the pool serves the next request."""
    tag = f"{driver}-{os.getpid()}-release"
    app = f"ctxmw-rel-{os.getpid()}-{driver}"[:63]

    async def main() -> None:
        async with _slow_release_target(driver, app) as (target, back):
            ctx, cancel = with_timeout(background(), DEADLINE)
            outcome: list[str] = []
            t0 = time.perf_counter()
            try:
                with pytest.raises(DeadlineExceeded):
                    async with ctx.scope():
                        try:
                            await _insert_released(driver, target, ctx, tag)
                        except BaseException as exc:
                            outcome.append(f"helper raised {exc!r}")
                            raise
                        outcome.append("helper returned")
                        await asyncio.sleep(5)  # the deadline interrupts this
                        outcome.append("not interrupted")
            finally:
                cancel()
            elapsed = time.perf_counter() - t0
            assert outcome == ["helper returned"], outcome
            assert elapsed < 2, elapsed
            assert await asyncio.to_thread(_release_rows, tag) == 1
            assert await _until(back), "a connection did not come back to the pool"
            states = await asyncio.to_thread(_sessions, app)
            assert not [s for s in states if s.startswith("idle in transaction")], states
            # The pool serves the next request, on a clean connection.
            ctx2, cancel2 = with_timeout(background(), 5)
            try:
                await _insert_released(driver, target, ctx2, tag + "-after")
            finally:
                cancel2()
            assert await asyncio.to_thread(_release_rows, tag + "-after") == 1
            assert await _until(back)

    asyncio.run(main())


@pytest.mark.usefixtures("release_table")
def test_a_release_that_hangs_after_commit_does_not_hide_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncpg's reset hook hangs (2 s) past the helper's bound on the release
    (5 s, 0.5 here): the helper returns all the same (the row committed), the
    connection the pool still holds is terminated, and once the hook returns
    the pool replaces it: nothing leaks, nothing is left in a transaction."""
    monkeypatch.setattr("ctxmiddleware._integrations._guard._CANCEL_WAIT", 0.5)
    tag = f"hang-{os.getpid()}"
    app = f"ctxmw-rel-{os.getpid()}-hang"

    async def hang() -> None:
        await asyncio.sleep(2)

    async def main() -> None:
        async with _slow_release_target("asyncpg-pool-reset", app, hang) as (pool, back):
            ctx, cancel = with_timeout(background(), DEADLINE)
            outcome: list[str] = []
            pids: list[int] = []
            t0 = time.perf_counter()
            try:
                with pytest.raises(DeadlineExceeded):
                    async with ctx.scope():
                        async with asyncpg_transaction(pool, ctx) as conn:
                            pids.append(conn.get_server_pid())
                            await conn.execute(f"INSERT INTO {RELEASE_TABLE} VALUES ($1)", tag)
                        outcome.append(f"helper returned after {time.perf_counter() - t0:.2f}s")
                        await asyncio.sleep(5)
            finally:
                cancel()
            assert len(outcome) == 1, outcome
            assert 0.4 < time.perf_counter() - t0 < 1.5, outcome
            assert await asyncio.to_thread(_release_rows, tag) == 1
            # Terminated: its server session is gone while the hook still hangs
            # (asyncpg opens a new one for the pool meanwhile).

            async def gone() -> bool:
                return pids[0] not in await asyncio.to_thread(_pids, app)

            assert await _until(gone, within=1), await asyncio.to_thread(_pids, app)
            assert await _until(back, within=5), "the pool did not get its holder back"
            ctx2, cancel2 = with_timeout(background(), 5)
            try:
                async with asyncpg_transaction(pool, ctx2) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
            finally:
                cancel2()
            states = await asyncio.to_thread(_sessions, app)
            assert not [s for s in states if s.startswith("idle in transaction")], states

    asyncio.run(main())
