"""Edge-triggered task cancellation driven by a context.

This is the one mechanism the package uses to interrupt asyncio code:
:class:`TaskCancellation` cancels a task once when a context is done, and
``async with ctx.scope()`` (:class:`CancelScope`), the ASGI middleware and the
integrations all go through it.

It follows the ``asyncio.timeout()`` recipe: when the context is done the task
is cancelled exactly once, and at the end ``Task.uncancel()`` tells our
cancellation apart from one that came from elsewhere. Once-only delivery
matters: database drivers (psycopg, SQLAlchemy) answer a ``CancelledError`` by
sending the server a cancel request, and a second cancellation (what anyio's
level-triggered scopes deliver at every await) interrupts that request and
leaves the query running on the server.

This module uses only the public behaviour of a context plus two core hooks
(``Context._on_done`` and ``Context._done_cause``), so it does not import the
context module, which imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._context import Context

__all__ = [
    "CancelScope",
    "TaskCancellation",
    "cancellation_as_ctx_err",
    "redeliver_cancellation",
]

_WATCHING, _CANCELLING, _DISARMED, _FINISHED = range(4)


class _TaskCancel:
    """One task.cancel() issued by our cancellations, until one claims it at its end."""

    __slots__ = ("claimed", "count", "holders")

    def __init__(self, holder: TaskCancellation, count: int) -> None:
        self.claimed = False
        #: task.cancelling() right after our task.cancel().
        self.count = count
        #: The cancellations waiting on this task.cancel() (nested scopes),
        #: weakly: they hold the task, the key of ``_pending``.
        self.holders = [weakref.ref(holder)]


_pending: weakref.WeakKeyDictionary[asyncio.Task[Any], _TaskCancel] = (
    weakref.WeakKeyDictionary()
)


class TaskCancellation:
    """Cancels ``task``, once, when ``ctx`` is done; watching starts at creation.

    Core-internal API (the public form is :class:`CancelScope`). ``cancelling``
    is ``task.cancelling()`` when the interruptible work began, which may be
    earlier than this object's creation (the middleware starts watching from
    a loop callback, after a grace period). Then:

    * :meth:`disarm` stops watching (the work may no longer be interrupted);
    * :meth:`finish`, when the work is over, raises ``ctx.err()`` (chained to
      the cause) if our cancellation interrupted it, and lets any other
      ``CancelledError`` pass untouched.
    """

    __slots__ = (
        "__weakref__", "_cancelling", "_ctx", "_loop", "_shared", "_state", "_task", "_unlink"
    )

    def __init__(self, ctx: Context, task: asyncio.Task[Any], cancelling: int) -> None:
        self._ctx = ctx
        self._task = task
        self._loop = task.get_loop()
        self._cancelling = cancelling
        self._state = _WATCHING
        self._shared: _TaskCancel | None = None
        # If the context is already done, this schedules the cancellation
        # right away, so the first await of the work raises.
        self._unlink = ctx._on_done(self._on_done)

    @property
    def cancel_called(self) -> bool:
        """True once the task has been cancelled by this object."""
        return self._shared is not None

    def _on_done(self) -> None:
        loop = self._loop
        if asyncio._get_running_loop() is loop:
            # Always from a loop callback, never right here: if the task itself
            # is running (it cancelled the context, or started watching a done
            # one), a task.cancel() now would stay pending after work that
            # never awaits, and hit the task's next await outside it.
            loop.call_soon(self._fire)
        else:
            # RuntimeError: loop closed, the task is gone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        if self._state != _WATCHING:
            return
        self._state = _CANCELLING
        task = self._task
        shared = _pending.get(task)
        if shared is not None and not shared.claimed:
            # Nested cancellations (the middleware's and a database helper's,
            # say) woken by the same context: one task.cancel() for all of
            # them, claimed by the innermost, which raises ctx.err().
            self._shared = shared
            shared.holders.append(weakref.ref(self))
            return
        task.cancel()
        self._shared = _pending[task] = _TaskCancel(self, task.cancelling())

    def _rearm(self) -> None:
        """Back to watching, and fire again from the next loop callback: at the
        task's next suspension, if the work is still under this cancellation."""
        self._state = _WATCHING
        self._shared = None
        self._loop.call_soon(self._fire)

    def disarm(self) -> bool:
        """Stop watching the context. False if the task was already cancelled."""
        state = self._state
        if state == _WATCHING:
            self._state = _DISARMED
            return True
        return state != _CANCELLING

    def finish(
        self, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> None:
        """The work is over, with ``exc`` (or none): stop watching, and raise
        ``ctx.err()`` in place of a ``CancelledError`` we caused."""
        unlink = self._unlink
        if unlink is not None:
            self._unlink = None
            unlink()
        state = self._state
        self._state = _FINISHED
        if state != _CANCELLING:
            return
        task = self._task
        shared = self._shared
        assert shared is not None
        if shared.claimed:
            return  # an inner cancellation took this one and raised already
        if (
            exc_type is None or not issubclass(exc_type, asyncio.CancelledError)
        ) and _undelivered(task, shared, self):
            # The work ended (returned, or failed on its own: the server's own
            # statement timeout answering first, say) before our task.cancel()
            # reached it, and an outer cancellation (the middleware's) waits
            # on the same one: its CancelledError is still to come, at the
            # task's next await. Leave it unclaimed, so that the outer one,
            # redeliver_cancellation() or cancellation_as_ctx_err() knows it
            # as ours (claimed and uncancelled here, it would look like a
            # cancellation from elsewhere: a bare CancelledError).
            return
        shared.claimed = True
        if _pending.get(task) is shared:
            del _pending[task]
        if task.uncancel() <= self._cancelling and (
            exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        ):
            ctx = self._ctx
            err = ctx.err()
            assert err is not None
            why = ctx._done_cause()
            # err is shared by every cancellation on this context: start a
            # fresh traceback, or each raise would append to the last one's.
            raise err.with_traceback(None) from (why if why is not err else exc)


def _undelivered(task: asyncio.Task[Any], shared: _TaskCancel, me: TaskCancellation) -> bool:
    """``task.cancel()`` was called but its CancelledError not thrown yet, and
    a cancellation other than ``me`` still waits on it."""
    if not getattr(task, "_must_cancel", False):
        return False
    for ref in shared.holders:
        holder = ref()
        if holder is not None and holder is not me and holder._state == _CANCELLING:
            return True
    return False


def cancellation_as_ctx_err(ctx: Context) -> AbstractAsyncContextManager[None]:
    """Raise ``ctx.err()`` in place of a ``CancelledError`` that leaves the block
    if it is our cancellation's (a :class:`TaskCancellation` on a done
    context: the middleware's, a scope's) and ``ctx`` is done::

        async with cancellation_as_ctx_err(ctx):
            ...  # BEGIN, ROLLBACK: steps a cancellation may land in

    For the database helpers: whichever fires first, the helper's own scope
    or the middleware's, the caller sees ``ctx.err()`` (``DeadlineExceeded``,
    ``Canceled``), never a bare ``CancelledError``. The cancellation is
    claimed (``Task.uncancel()``), as the scope that issued it would have. A
    ``CancelledError`` from elsewhere (server shutdown: a cancel request of
    its own is pending) passes through untouched.
    """
    return _CancellationAsCtxErr(ctx)


class _CancellationAsCtxErr:
    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            return
        ctx = self._ctx
        err = ctx.err()
        task = asyncio.current_task()
        if err is None or task is None:
            return
        shared = _pending.get(task)
        if shared is not None:
            if shared.claimed or task.cancelling() != shared.count:
                return
            shared.claimed = True
            del _pending[task]
            task.uncancel()
        elif task.cancelling():
            return  # not ours: a cancel request from elsewhere is pending
        # (else no cancel request is pending at all: ours, claimed by a scope
        # that ended before its CancelledError was thrown.)
        why = ctx._done_cause()
        raise err.with_traceback(None) from (why if why is not err else exc)


def redeliver_cancellation(task: asyncio.Task[Any]) -> bool:
    """Withdraw the ``CancelledError`` our cancellation delivered to ``task``,
    which the caller caught and will not re-raise; deliver it again at the
    task's next suspension (if the work is still under the cancellation then).

    For an operation that completed although the cancellation landed while it
    ran (a database COMMIT): it returns its result, and the cancellation
    interrupts whatever the task awaits next. Returns False if the task has
    no such cancellation pending, or another cancel request besides ours (a
    cancellation from elsewhere): the caller must re-raise its
    ``CancelledError``.
    """
    shared = _pending.get(task)
    if shared is None or shared.claimed or task.cancelling() != shared.count:
        return False
    del _pending[task]
    task.uncancel()
    for ref in shared.holders:
        holder = ref()
        if holder is not None and holder._state == _CANCELLING and holder._shared is shared:
            holder._rearm()
    return True


class CancelScope:
    """Cancels the task that entered it, once, when its context is done.

    At the exit, if that cancellation interrupted the block, the block raises
    ``ctx.err()`` (a :class:`Canceled` or :class:`DeadlineExceeded`) chained
    to the cause; a cancellation from anywhere else propagates as
    ``asyncio.CancelledError``, untouched.
    """

    __slots__ = ("_cancellation", "_ctx")

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._cancellation: TaskCancellation | None = None

    @property
    def cancel_called(self) -> bool:
        """True once this scope has cancelled its task."""
        return self._cancellation is not None and self._cancellation.cancel_called

    async def __aenter__(self) -> Context:
        if self._cancellation is not None:
            raise RuntimeError("a scope can be entered only once")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("ctx.scope() must be used inside an asyncio task")
        self._cancellation = TaskCancellation(self._ctx, task, task.cancelling())
        return self._ctx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cancellation = self._cancellation
        assert cancellation is not None
        cancellation.finish(exc_type, exc)
