"""The demo service.

Try it (``make run`` in one terminal)::

    curl -i localhost:8000/slow?seconds=10        # press Ctrl-C: the log says "cancelled"
    curl -i -H 'x-request-timeout-ms: 500' localhost:8000/slow   # 504 after 0.5 s
    curl -i -H 'Authorization: Bearer s3cret' localhost:8000/values
"""

from __future__ import annotations

import asyncio
import logging
import os

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import AUTH_TOKEN, CLIENT_IP, REQUEST_ID, Context

log = logging.getLogger("example_app")


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


routes = [
    Route("/slow", slow),
    Route("/values", values),
    Route("/background", background),
]

app = ctxmiddleware.ContextMiddleware(
    Starlette(routes=routes),
    timeout=float(os.environ.get("REQUEST_TIMEOUT", "30")),
    trusted_proxies=[p for p in os.environ.get("TRUSTED_PROXIES", "").split(",") if p],
)
