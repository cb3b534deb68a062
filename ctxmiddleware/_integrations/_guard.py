"""Out-of-band cancellation shared by the database integrations.

A driver's own cancellation only works when the code awaiting it is cancelled
once (edge-triggered). Sync code in a worker thread is never cancelled at all,
and anyio's level-triggered scopes (Starlette's ``StreamingResponse``) interrupt
the driver's cancel request. So every helper also registers, with
``after_func``, a cancel that goes to the server through a side channel (libpq's
``PQcancel``, a raw PostgreSQL CancelRequest, sqlite's ``interrupt()``) the
moment the context is done, and waits for it to finish before the connection is
used again (a late cancel could otherwise hit the next statement).

The same cancellations would also interrupt the ROLLBACK that follows a
cancelled query, leaving the connection ``idle in transaction (aborted)``:
:func:`run_to_end` and :func:`finish_uninterrupted` let it complete.

A COMMIT is never interrupted either, and one that completes is never
reported as a failure: a cancellation of the task that lands while it runs is
held by :class:`CommitOutcome` until the helper returns, then delivered again
at the task's next suspension. Nor is what follows a COMMIT, handing the
connection back to the pool (release, reset, the session's close): see
:class:`ReleaseStack`. So a handler can rely on one rule: if the helper
returned, the transaction committed; if it raised ``ctx.err()``, it rolled
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import anyio

from .._core import Context, after_func, count_cancel, note_wait, redeliver_cancellation

__all__ = [
    "CommitOutcome",
    "OutOfBandCancel",
    "ReleaseStack",
    "finish_uninterrupted",
    "run_to_end",
    "statement_timeout_ms",
]

T = TypeVar("T")

_log = logging.getLogger("ctxmiddleware")

# A cancel request normally completes in a few ms; bound the wait so a dead
# server cannot hang the request.
_CANCEL_WAIT = 5.0
# How often a guard that has fired stops statements started since (see ``again``).
_AGAIN_EVERY = 0.001


class OutOfBandCancel:
    """Runs ``cancel()`` in its own thread once ``ctx`` is done, until closed.

    A cancel finds nothing to stop if the code is between two statements when
    the context is done, and the next statement would then run unhindered in
    sync code (nothing cancels a thread). So with ``again`` the thread goes on
    calling ``again()`` every ``_AGAIN_EVERY`` seconds until the guard is
    closed: a statement started after the context was done is stopped too.
    """

    __slots__ = (
        "_again", "_cancel", "_closed", "_closing", "_finished", "_kind", "_stop", "_unwait"
    )

    def __init__(
        self,
        ctx: Context,
        cancel: Callable[[], object],
        again: Callable[[], object] | None = None,
        *,
        kind: str = "db",
        what: str | None = None,
    ) -> None:
        """``kind``: the driver, as ``stats()`` counts the cancels sent;
        ``what``: what the request waits on meanwhile (the live requests page)."""
        self._cancel = cancel
        self._kind = kind
        self._unwait = None if what is None else note_wait(ctx, what)
        self._again = again
        self._closed = False
        self._closing = threading.Event()
        self._finished = threading.Event()
        self._stop = after_func(ctx, self._run)

    def _run(self) -> None:
        try:
            count_cancel(self._kind)
            self._cancel()
            again = self._again
            if again is not None:
                while not self._closing.wait(_AGAIN_EVERY):
                    again()
        finally:
            self._finished.set()

    def close(self) -> bool:
        """Stop watching; if the cancel already started, wait for it (blocking).

        Returns True if a cancel was sent.
        """
        done = self._begin_close()
        if done is not None:
            return done
        self._finished.wait(_CANCEL_WAIT)
        return True

    async def aclose(self) -> bool:
        """Like :meth:`close`, without blocking the event loop or being interrupted.

        A cancellation that arrives meanwhile is re-raised after the wait.
        """
        done = self._begin_close()
        if done is not None:
            return done
        if not self._finished.is_set():
            await run_to_end(anyio.to_thread.run_sync(self._finished.wait, _CANCEL_WAIT))
        return True

    def _begin_close(self) -> bool | None:
        """Stop watching. The result of close() if there is nothing to wait for,
        else None: a cancel has started and close() must wait for it."""
        if self._closed:
            return self._finished.is_set()
        self._closed = True
        if self._unwait is not None:
            self._unwait()
        if self._stop():
            return False
        self._closing.set()
        return None


def statement_timeout_ms(ctx: Context) -> int | None:
    """The context's remaining time in whole ms, rounded up, or None without a deadline.

    Rounded up so that the server never aborts a statement before the
    context's deadline: the driver's error would then arrive while
    ``ctx.err()`` is still None, and could not be reported as ``ctx.err()``.
    Raises ``ctx.err()`` if the context is already done.
    """
    ctx.check()
    remaining = ctx.remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        ctx.check()  # the deadline has passed just now
    return max(1, math.ceil(remaining * 1000))


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning


async def run_to_end(
    aw: Awaitable[T],
    on_timeout: Callable[[], object] | None = None,
    outcome: CommitOutcome | None = None,
) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile.

    A cancellation that arrives meanwhile (anyio's level-triggered ones are held
    off, a native one is caught) is re-raised once ``aw`` is done; or, if
    ``aw`` succeeded and ``outcome`` is given, kept there (see
    :class:`CommitOutcome`). The wait is
    bounded: after ``_CANCEL_WAIT`` seconds ``aw`` is cancelled, ``on_timeout()``
    is called (close the connection: its state is unknown) and ``TimeoutError``
    (or the pending cancellation) is raised.
    """
    task = asyncio.ensure_future(aw)
    cancelled = await _wait_shielded(task)
    if not task.done():
        task.cancel()
        task.add_done_callback(_consume)
        if on_timeout is not None:
            on_timeout()
        if cancelled is not None:
            raise cancelled
        raise TimeoutError(f"database cleanup did not finish within {_CANCEL_WAIT}s")
    if cancelled is not None:
        if outcome is not None and not task.cancelled() and task.exception() is None:
            outcome.cancelled = cancelled  # it committed: report that first
            return task.result()
        _consume(task)
        raise cancelled
    return task.result()


async def _wait_shielded(task: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait for ``task`` at most ``_CANCEL_WAIT`` seconds, cancellations held
    off; returns the one that arrived meanwhile (the last), if any."""
    loop = asyncio.get_running_loop()
    cancelled: asyncio.CancelledError | None = None
    end = loop.time() + _CANCEL_WAIT
    with anyio.CancelScope(shield=True):
        while not task.done():
            left = end - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait((task,), timeout=left)
            except asyncio.CancelledError as exc:
                cancelled = exc
    return cancelled


class CommitOutcome:
    """The outermost block of a transaction helper: a cancellation of the task
    that landed during a COMMIT that succeeded is not raised by the helper.

    ``run_to_end(..., outcome=self)`` keeps it in :attr:`cancelled`; at the
    end of this block (the helper has let go of its connection) it is
    delivered again, at the task's next suspension, to the scope that
    cancelled the task (:func:`redeliver_cancellation`), which raises
    ``ctx.err()`` there. A cancellation from elsewhere (server shutdown) is
    re-raised at once, as before.
    """

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled: BaseException | None = None

    async def __aenter__(self) -> CommitOutcome:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        cancelled = self.cancelled
        if cancelled is None:
            return
        self.cancelled = None
        task = asyncio.current_task()
        if task is not None and redeliver_cancellation(task):
            return
        raise cancelled


# Releases still running when a helper stopped waiting (see ReleaseStack).
_releasing: set[asyncio.Future[Any]] = set()


def _released(task: asyncio.Future[Any]) -> None:
    _releasing.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.warning(
            "ctxmiddleware: handing a connection back to its pool failed after"
            " the COMMIT (the transaction committed)", exc_info=exc,
        )


class ReleaseStack(contextlib.AsyncExitStack):
    """A helper's exit stack (the pool's connection, the session, the guards),
    whose exit after a COMMIT never reports the transaction as failed.

    If the block ended without an error (the COMMIT succeeded), the exit
    (handing the connection back to the pool: asyncpg's release and reset,
    psycopg_pool's ``putconn``, SQLAlchemy's session close) runs to its end
    like the COMMIT (:func:`run_to_end`): a cancellation that lands meanwhile
    is kept in ``outcome`` and delivered again at the task's next suspension
    after the helper returns (:class:`CommitOutcome`), and an error of the
    release is logged, not raised. The wait is bounded (``_CANCEL_WAIT``,
    5 s): a release still running then (a pool reset that hangs) is left to
    finish in the background, ``on_timeout()`` is called (set it once the
    connection is known: close the connection if the pool has not taken it
    back yet) and the helper returns all the same.

    After an error (the transaction rolled back, or its outcome is unknown)
    the exit runs as any exit stack's.
    """

    def __init__(self, outcome: CommitOutcome) -> None:
        super().__init__()
        self.outcome = outcome
        self.on_timeout: Callable[[], object] | None = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if exc_type is not None:
            return await super().__aexit__(exc_type, exc, tb)
        task = asyncio.ensure_future(super().__aexit__(None, None, None))
        cancelled = await _wait_shielded(task)
        if cancelled is not None:
            self.outcome.cancelled = cancelled  # it committed: report that first
        if task.done():
            _released(task)
            return False
        _releasing.add(task)
        task.add_done_callback(_released)
        on_timeout = self.on_timeout
        if on_timeout is not None:
            try:
                on_timeout()
            except Exception:
                _log.warning("ctxmiddleware: closing an unreleased connection failed",
                             exc_info=True)
        _log.warning(
            "ctxmiddleware: the pool did not take the connection back within %ss of"
            " the COMMIT; the release goes on in the background", _CANCEL_WAIT,
        )
        return False


@contextlib.asynccontextmanager
async def finish_uninterrupted(
    cm: AbstractAsyncContextManager[T],
    on_timeout: Callable[[], object] | None = None,
    repair: Callable[[bool], Awaitable[object] | None] | None = None,
    outcome: CommitOutcome | None = None,
) -> AsyncIterator[T]:
    """Enter ``cm`` normally; run its exit (COMMIT or ROLLBACK) with :func:`run_to_end`.

    With ``outcome``, a cancellation that lands during a COMMIT that succeeds
    is kept there rather than raised (see :class:`CommitOutcome`).

    If entering or exiting fails (BEGIN interrupted; a ROLLBACK hit by a late
    cancel request), ``repair(entering)`` may return a repair to run to the
    end, such as another ROLLBACK; its own errors are dropped and the
    original error propagates. After a rollback it is called even when the
    exit did not raise (a driver may log a failed ROLLBACK and carry on), so
    it must check the connection's state first.
    """
    try:
        value = await cm.__aenter__()
    except BaseException:
        await _repair(repair, True, on_timeout)
        raise
    try:
        yield value
    except BaseException as exc:
        try:
            swallow = await run_to_end(
                cm.__aexit__(type(exc), exc, exc.__traceback__), on_timeout
            )
        except BaseException:
            await _repair(repair, False, on_timeout)
            raise
        # Not only when the exit raised: psycopg logs a failed ROLLBACK and lets
        # the block's error through, leaving the connection in the transaction.
        await _repair(repair, False, on_timeout)
        if not swallow:
            raise
    else:
        try:
            await run_to_end(cm.__aexit__(None, None, None), on_timeout, outcome)
        except BaseException:
            await _repair(repair, False, on_timeout)
            raise


async def _repair(
    repair: Callable[[bool], Awaitable[object] | None] | None,
    entering: bool,
    on_timeout: Callable[[], object] | None,
) -> None:
    fix = repair(entering) if repair is not None else None
    if fix is not None:
        with contextlib.suppress(Exception):
            await run_to_end(fix, on_timeout)
