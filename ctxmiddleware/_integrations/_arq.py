"""arq: jobs enqueued inside a request inherit its request id and deadline.

arq has no message headers, so the stamp travels as one keyword argument
(``ctxmiddleware=``) that the worker-side decorator takes off again::

    # in the web service, inside a request
    job = await ctxmiddleware.arq_enqueue(redis, "report", day)

    # in the worker
    @ctxmiddleware.arq_job
    async def report(ctx, day): ...          # current() carries the request's id and deadline

    class WorkerSettings:
        functions = [report]

:func:`arq_enqueue` is ``redis.enqueue_job`` plus the stamp (the request id
and the deadline as an epoch instant) and ``_expires`` set to the budget
left (an earlier ``_expires`` of the caller stands): a worker that would
start the job after the deadline does not run it (arq's "job expired").

:func:`arq_job` wraps a worker function: it runs under a root context with
that id and deadline (``current()``; :class:`~ctxmiddleware.RequestContextFilter`
shows the id in the worker's logs), is cancelled at the deadline (it raises
``DeadlineExceeded``), and is not started at all if the deadline has already
passed. Without a stamp (a job enqueued by plain ``enqueue_job``) the function
runs as it would without the decorator.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._core import CURRENT_CONTEXT, Context, DeadlineExceeded, after_func, current
from ._jobs import STAMP_KEY, cut_short, job_context, seconds_left, stamp_of

__all__ = ["arq_abort_on_cancel", "arq_enqueue", "arq_job"]

_aborting: set[asyncio.Task[Any]] = set()

T = TypeVar("T")


async def arq_enqueue(redis: Any, function: str, *args: Any, **kwargs: Any) -> Any:
    """``await redis.enqueue_job(function, *args, **kwargs)``, stamped with the
    current context's request id and deadline; returns arq's ``Job`` (or None
    if a job with that ``_job_id`` exists)."""
    stamp = stamp_of(current())
    if stamp is not None:
        if STAMP_KEY in kwargs:
            raise TypeError(f"arq_enqueue() sets the {STAMP_KEY!r} keyword argument itself")
        kwargs[STAMP_KEY] = stamp
        left = seconds_left(stamp)
        if left is not None:
            if left <= 0:
                raise DeadlineExceeded("the request's deadline passed before the job was enqueued")
            mine = kwargs.get("_expires")
            if isinstance(mine, datetime.timedelta):
                mine = mine.total_seconds()
            if mine is None or left < float(mine):
                kwargs["_expires"] = datetime.timedelta(seconds=left)
    return await redis.enqueue_job(function, *args, **kwargs)


def arq_job(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Worker side: run ``fn(ctx, *args, **kwargs)`` under the enqueuing request's
    id and deadline (see the module's docs)."""

    @functools.wraps(fn)
    async def job(arq_ctx: Any, *args: Any, **kwargs: Any) -> T:
        stamp = kwargs.pop(STAMP_KEY, None)
        if not isinstance(stamp, dict):
            return await fn(arq_ctx, *args, **kwargs)
        ctx, cancel = job_context(stamp)
        token = CURRENT_CONTEXT.set(ctx)
        try:
            ctx.check()  # the deadline passed while queued: not run
            async with ctx.scope():
                return await fn(arq_ctx, *args, **kwargs)
        finally:
            cancel()
            CURRENT_CONTEXT.reset(token)

    return job


def arq_abort_on_cancel(job: Any, ctx: Context | None = None) -> Callable[[], bool]:
    """Make an enqueued job request-bound: abort it (arq's ``Job.abort``) if the
    request is cut short (the client leaves, the deadline passes); not when
    the request just ends.

    Call it in the event loop, with the ``Job`` that :func:`arq_enqueue`
    returned; ``ctx`` defaults to ``current()``. The worker needs
    ``allow_abort_jobs = True``: a queued job is then not started, a running
    one is cancelled. Returns ``stop()`` (see :func:`~ctxmiddleware.after_func`).
    """
    ctx = current() if ctx is None else ctx
    loop = asyncio.get_running_loop()

    async def abort() -> None:
        with contextlib.suppress(Exception):
            await job.abort(timeout=0)

    def start() -> None:
        task = loop.create_task(abort())
        _aborting.add(task)
        task.add_done_callback(_aborting.discard)

    def fire() -> None:
        if cut_short(ctx):
            with contextlib.suppress(RuntimeError):  # (the loop is closed)
                loop.call_soon_threadsafe(start)

    return after_func(ctx, fire)
