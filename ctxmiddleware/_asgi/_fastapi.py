"""FastAPI dependencies: ``ctx: RequestContext`` and per-route timeouts."""

from __future__ import annotations

import datetime
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from .._core import Context, RootContext
from .._request import positive_seconds, set_request_timeout

__all__ = ["RequestContext", "RouteTimeout", "request_context"]


def request_context(conn: HTTPConnection) -> Context:
    """The request's context (``request.state.ctx``), set by ContextMiddleware."""
    ctx = conn.scope.get("state", {}).get("ctx")
    if not isinstance(ctx, Context):
        raise RuntimeError("ContextMiddleware is not installed on this app")
    if type(ctx) is RootContext and ctx.active is not None:
        return ctx.active  # set_request_context() from a worker thread
    return ctx


RequestContext = Annotated[Context, Depends(request_context)]
"""``async def handler(ctx: RequestContext)``: the request's context."""


def RouteTimeout(seconds: float | datetime.timedelta | None) -> Any:
    """A route option: ``@app.get("/report", dependencies=[RouteTimeout(120)])``.

    Same rules as :func:`ctxmiddleware.route_timeout`: ``seconds`` (or a
    ``timedelta``) must be positive and finite, or ``None`` (no deadline); a
    bad value raises ``TypeError`` or ``ValueError`` here, not per request.
    """
    checked = None if seconds is None else positive_seconds(seconds, "RouteTimeout")

    async def apply() -> None:  # async: runs on the loop, not in a worker thread
        set_request_timeout(checked)

    return Depends(apply)
