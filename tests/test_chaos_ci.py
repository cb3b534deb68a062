"""The chaos soak (bench/chaos.py) at CI size, and the findings it made.

``bench/chaos.py --requests 300`` runs random fates (disconnects at every
phase, budgets, exceptions, background tasks, sync endpoints, websockets)
against uvicorn (httptools, h11), hypercorn and, when the WSGI adapter is
there, gunicorn, with asyncpg, psycopg, SQLAlchemy and SQLite handlers, then
checks that nothing leaked (request objects, tasks, timers, pool
connections, PostgreSQL sessions), that every row is there exactly when its
transaction committed, that uploads arrived intact and that the server
logs are clean. Any violation fails the build, except (``--allow``):

* ``rss``: at CI size the whole run is the stack's warm-up (pools, thread
  pools and the allocators' high-water mark settle after about 2,000
  requests), so RSS is reported, not judged, here. The full soak judges it:
  ``bench/chaos.py --requests 10000 --floor`` checks the growth after the
  first fifth against the same fates without the middleware
  (bench/RESULTS.md, "Chaos soak").

Needs PostgreSQL at ``$CTXMIDDLEWARE_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``): skipped when unreachable,
failed instead when ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg")
asyncpg = pytest.importorskip("asyncpg")

import ctxmiddleware  # noqa: E402
from ctxmiddleware import ContextError, background, with_timeout  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALLOW = "rss"
DSN = os.environ.get("CTXMIDDLEWARE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module", autouse=True)
def postgres() -> None:
    try:
        psycopg.connect(DSN, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL not reachable at {DSN}: {exc}".strip()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.timeout(120)
def test_chaos_soak_ci_size() -> None:
    """300 requests per ASGI server (60 for gunicorn); the seed is random and
    printed, so a failure can be replayed with ``--seed``."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--requests", "300",
         "--allow", ALLOW],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "chaos: PASS" in result.stdout


# -- a fixed finding (commit-outcome): a deadline during the pool release after COMMIT --
#
# The helper raised DeadlineExceeded for a committed transaction when the
# deadline landed while it handed the connection back to the pool (about 1 in
# 1,000 chaos requests). Now the release runs to its end and the helper
# returns; the deadline interrupts the handler's next await instead.


def _committed(rid: str) -> bool:
    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM chaos_ci_commit WHERE rid = %s", [rid]).fetchone()
        return row is not None


async def _insert_then_slow_release(kind: str) -> tuple[str, BaseException | None]:
    """Insert a row; the pool's reset (on release, after the COMMIT) takes 300 ms;
    the deadline (150 ms) falls inside it. Returns what the helper itself
    raised (the sleep after it must raise DeadlineExceeded)."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS chaos_ci_commit (rid text PRIMARY KEY)")
    rid = uuid.uuid4().hex
    ctx, cancel = with_timeout(background(), 0.15)
    raised: BaseException | None = None
    after: BaseException | None = None
    if kind == "asyncpg":

        async def slow_reset(conn: object) -> None:
            await asyncio.sleep(0.3)

        pool = await asyncpg.create_pool(DSN, min_size=1, max_size=1, reset=slow_reset)
        try:
            async with ctx.scope():
                try:
                    async with ctxmiddleware.asyncpg_transaction(pool, ctx) as conn:
                        await conn.execute("INSERT INTO chaos_ci_commit VALUES ($1)", rid)
                except BaseException as exc:
                    raised = exc
                    raise
                await asyncio.sleep(1)  # the deadline lands here, after the helper
        except ContextError as exc:
            after = exc
        finally:
            await pool.close()
    else:
        psycopg_pool = pytest.importorskip("psycopg_pool")

        async def slow_reset_psycopg(conn: object) -> None:
            await asyncio.sleep(0.3)

        ppool = psycopg_pool.AsyncConnectionPool(
            DSN, min_size=1, max_size=1, open=False, reset=slow_reset_psycopg,
            kwargs={"autocommit": True},
        )
        await ppool.open(wait=True)
        try:
            async with ctx.scope():
                try:
                    async with ctxmiddleware.psycopg_transaction(ppool, ctx) as pconn:
                        await pconn.execute("INSERT INTO chaos_ci_commit VALUES (%s)", [rid])
                except BaseException as exc:
                    raised = exc
                    raise
                await asyncio.sleep(1)
        except ContextError as exc:
            after = exc
        finally:
            await ppool.close()
    cancel()
    assert after is not None, "the deadline did not interrupt the sleep after the helper"
    return rid, raised


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg"])
def test_a_deadline_during_the_pool_release_does_not_report_a_commit_as_failed(
    kind: str,
) -> None:
    rid, raised = asyncio.run(_insert_then_slow_release(kind))
    committed = _committed(rid)
    # The rule: returned <=> committed. (Either outcome is fine, not a mix.)
    assert (raised is None) == committed, (
        f"helper raised {raised!r}, row committed: {committed}"
    )
