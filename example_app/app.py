"""The demo service.

Try it (``make run`` in one terminal)::

    curl -i localhost:8000/slow?seconds=10        # press Ctrl-C: the log says "cancelled"
    curl -i -H 'x-request-timeout-ms: 500' localhost:8000/slow   # 504 after 0.5 s
    curl -i localhost:8000/report?seconds=5       # a slow SQL query; Ctrl-C stops it in the DB
    curl -i localhost:8000/fanout                 # downstream call + query, cancelled together
    curl -i -H 'Authorization: Bearer s3cret' localhost:8000/values

Environment: ``DATABASE_URL`` (``postgresql://...``; default: embedded SQLite),
``DOWNSTREAM_URL`` (the service ``/fanout`` calls; default: this one),
``REQUEST_TIMEOUT`` (seconds, default 30), ``TRUSTED_PROXIES`` (comma-separated
IPs/CIDRs), ``HOST``/``PORT`` (see ``__main__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

import ctxmiddleware
from ctxmiddleware import AUTH_TOKEN, CLIENT_IP, REQUEST_ID, Context
from ctxmiddleware.debugpage import RequestsPage

from .db import Database

log = logging.getLogger("example_app")
db = Database()


async def slow(request: Request) -> Response:
    """Works for ``seconds`` (default 10), one step at a time, until cancelled."""
    ctx: Context = request.state.ctx
    seconds = float(request.query_params.get("seconds", "10"))
    log.info("slow: working for %.1f s (deadline in %.1f s)", seconds, ctx.remaining() or -1)
    try:
        for step in range(int(seconds * 10)):
            await asyncio.sleep(0.1)
            if step % 10 == 9:
                log.info("slow: %d s done", (step + 1) // 10)
    except asyncio.CancelledError:
        log.warning(
            "slow: cancelled: err=%r cause=%r", ctx.err(), ctxmiddleware.cause(ctx)
        )
        raise
    return PlainTextResponse(f"worked {seconds} s\n")


async def values(request: Request) -> Response:
    """Echoes the request-scoped values (the token stays redacted)."""
    ctx = ctxmiddleware.current()
    return JSONResponse(
        {
            "request_id": ctx.value(REQUEST_ID),
            "client_ip": ctx.value(CLIENT_IP),
            "auth_token": str(ctx.value(AUTH_TOKEN)),
            "deadline_in_s": ctx.remaining(),
            "context": str(ctx),
        }
    )


async def audit(ctx: Context) -> None:
    # Runs after the response: the request context is cancelled by then, so
    # the task works under without_cancel() with a timeout of its own.
    job, cancel = ctxmiddleware.with_timeout(ctxmiddleware.without_cancel(ctx), 5)
    try:
        await asyncio.sleep(0.2)
        log.info("background: audit written for %s", job.value(REQUEST_ID))
    finally:
        cancel()


async def background(request: Request) -> Response:
    """Answers at once; a BackgroundTask finishes the work after the response."""
    return PlainTextResponse("accepted\n", background=BackgroundTask(audit, request.state.ctx))


async def report(request: Request) -> Response:
    """A slow SQL query that stops in the database when the request is cancelled."""
    ctx: Context = request.state.ctx
    seconds = float(request.query_params.get("seconds", "5"))
    started = time.monotonic()
    try:
        result = await db.slow_report(seconds, ctx)
    except (ctxmiddleware.ContextError, asyncio.CancelledError):
        log.warning(
            "report: query stopped after %.3f s: err=%r cause=%r",
            time.monotonic() - started, ctx.err(), ctxmiddleware.cause(ctx),
        )
        raise
    return PlainTextResponse(result + "\n")


async def fanout(request: Request) -> Response:
    """Calls the downstream service and the database concurrently.

    The spawned tasks inherit the request context (``current()``), so a
    disconnect or the deadline cancels them all: the downstream service sees
    its client (us) go away, and the query stops in the database.
    """
    seconds = float(request.query_params.get("seconds", "3"))
    downstream = os.environ.get("DOWNSTREAM_URL") or f"http://{request.url.netloc}"
    ctx = ctxmiddleware.current()
    # No httpx timeout of its own: the request's deadline bounds the call.
    params = {"seconds": seconds}
    async with ctxmiddleware.httpx_async_client(timeout=None) as client, asyncio.TaskGroup() as tg:
        call = tg.create_task(client.get(f"{downstream}/report", params=params))
        query = tg.create_task(db.slow_report(seconds, ctx))
    return JSONResponse(
        {"downstream": call.result().text.strip(), "database": query.result()}
    )


async def healthz(request: Request) -> Response:
    return PlainTextResponse(f"ok {db.kind}\n")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await db.open()
    try:
        yield
    finally:
        await db.close()


routes = [
    Route("/slow", slow),
    Route("/report", report),
    Route("/fanout", fanout),
    Route("/values", values),
    Route("/background", background),
    Route("/healthz", healthz),
    # The live requests page (loopback clients only): what is running, how it ended.
    Mount("/debug/requests", RequestsPage().asgi_app()),
]

app = ctxmiddleware.ContextMiddleware(
    Starlette(routes=routes, lifespan=lifespan),
    timeout=float(os.environ.get("REQUEST_TIMEOUT", "30")),
    trusted_proxies=[p for p in os.environ.get("TRUSTED_PROXIES", "").split(",") if p],
)
