"""What a background job inherits from the request that enqueued it.

A job is stamped, when enqueued, with the request id, the cause chain (the
ids of the requests and jobs that led to it: a job enqueued by a job carries
its parent's chain plus its parent's id) and the request's deadline as an
absolute wall-clock instant (``time.time()``: the worker is another process,
maybe another machine, so the monotonic clock does not travel); the worker
gives the job a root context with that id, chain (``CAUSE_CHAIN``) and deadline.
Shared by the Celery and arq integrations.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .._core import (
    CAUSE_CHAIN,
    REQUEST_ID,
    CancelFunc,
    ClientDisconnected,
    Context,
    DeadlineExceeded,
    background,
    cause,
    with_cancel,
    with_deadline,
    with_value,
)

__all__ = ["STAMP_KEY", "cut_short", "job_context", "seconds_left", "stamp_of"]

STAMP_KEY = "ctxmiddleware"
"""The Celery header / arq keyword argument that carries the stamp."""


MAX_CHAIN = 32
"""A cause chain keeps its newest 32 ids: a loop of jobs enqueueing jobs must not
grow the stamp without bound."""


def stamp_of(ctx: Context) -> dict[str, Any] | None:
    """``{"request_id": ..., "chain": [...], "deadline": <epoch seconds>}`` (each
    only if set), or None."""
    stamp: dict[str, Any] = {}
    request_id = ctx.value(REQUEST_ID)
    if request_id is not None:
        stamp["request_id"] = request_id
        before = ctx.value(CAUSE_CHAIN)
        chain: list[str] = [] if before is None else list(before)
        if not chain or chain[-1] != request_id:
            chain.append(request_id)
        stamp["chain"] = chain[-MAX_CHAIN:]
    remaining = ctx.remaining()
    if remaining is not None:
        stamp["deadline"] = time.time() + remaining
    return stamp or None


def job_context(stamp: object, base: Context | None = None) -> tuple[Context, CancelFunc]:
    """A root context for a job: the stamp's request id and deadline (a
    malformed stamp is ignored, piece by piece)."""
    ctx = background() if base is None else base
    request_id = stamp.get("request_id") if isinstance(stamp, dict) else None
    if isinstance(request_id, str) and 0 < len(request_id) <= 128:
        ctx = with_value(ctx, REQUEST_ID, request_id)
    chain = stamp.get("chain") if isinstance(stamp, dict) else None
    if (
        isinstance(chain, list)
        and 0 < len(chain) <= MAX_CHAIN
        and all(isinstance(i, str) and 0 < len(i) <= 128 and i.isprintable() for i in chain)
    ):
        ctx = with_value(ctx, CAUSE_CHAIN, tuple(chain))
    deadline = stamp.get("deadline") if isinstance(stamp, dict) else None
    if (
        isinstance(deadline, (int, float))
        and not isinstance(deadline, bool)
        and math.isfinite(deadline)
    ):
        left = min(deadline - time.time(), 10 * 365 * 86400.0)
        return with_deadline(ctx, time.monotonic() + left)
    return with_cancel(ctx)


def seconds_left(stamp: dict[str, Any] | None) -> float | None:
    """The stamp's budget left now, in seconds (None: no deadline)."""
    if stamp is None or "deadline" not in stamp:
        return None
    return float(stamp["deadline"]) - time.time()


def cut_short(ctx: Context) -> bool:
    """``ctx`` ended because the client left or the deadline passed (not
    because the request simply returned, which also cancels its root)."""
    return isinstance(ctx.err(), DeadlineExceeded) or isinstance(cause(ctx), ClientDisconnected)
