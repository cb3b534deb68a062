"""Edge-triggered task cancellation driven by a context: ``async with ctx.scope()``.

This is the one mechanism the package uses to interrupt asyncio code: the scope,
the ASGI middleware and the integrations all go through :class:`CancelScope`.

It follows the ``asyncio.timeout()`` recipe: when the context is done the task
is cancelled exactly once, and at the exit ``Task.uncancel()`` tells our
cancellation apart from one that came from elsewhere. Once-only delivery
matters: database drivers (psycopg, SQLAlchemy) answer a ``CancelledError`` by
sending the server a cancel request, and a second cancellation (what anyio's
level-triggered scopes deliver at every await) interrupts that request and
leaves the query running on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._context import _subscribe, cause

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["CancelScope"]

_CREATED, _ENTERED, _CANCELLING, _DISARMED, _EXITED = range(5)


class _TaskCancel:
    """One task.cancel() issued by our scopes, until a scope claims it at its exit."""

    __slots__ = ("claimed",)

    def __init__(self) -> None:
        self.claimed = False


_pending: weakref.WeakKeyDictionary[asyncio.Task[Any], _TaskCancel] = (
    weakref.WeakKeyDictionary()
)


class CancelScope:
    """Cancels the task that entered it, once, when its context is done.

    At the exit, if that cancellation interrupted the block, the block raises
    ``ctx.err()`` (a :class:`Canceled` or :class:`DeadlineExceeded`) chained
    to the cause; a cancellation from anywhere else propagates as
    ``asyncio.CancelledError``, untouched.
    """

    __slots__ = (
        "_cancelling", "_ctx", "_fired", "_loop", "_shared", "_state", "_task", "_unlink",
    )

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = _CREATED
        self._unlink: object = None
        self._cancelling = 0
        self._fired = False
        self._shared: _TaskCancel | None = None

    @property
    def cancel_called(self) -> bool:
        """True once this scope has cancelled its task."""
        return self._fired

    async def __aenter__(self) -> Context:
        return self._enter()

    def _enter(self) -> Context:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("ctx.scope() must be used inside an asyncio task")
        return self._enter_task(task, task.cancelling())

    def _enter_task(self, task: asyncio.Task[Any], cancelling: int) -> Context:
        """Watch for ``task``, which was at ``cancelling`` when its block began.

        (The middleware starts watching only after a grace period, from a loop
        callback: the block itself began earlier, in ``task``.)
        """
        if self._state != _CREATED:
            raise RuntimeError("a scope can be entered only once")
        self._task = task
        self._loop = task.get_loop()
        self._cancelling = cancelling
        self._state = _ENTERED
        # If the context is already done, this cancels the task right away, so
        # the first await inside the block raises (like an expired timeout).
        self._unlink = _subscribe(self._ctx, self._on_done, pin=False)
        return self._ctx

    def _on_done(self) -> None:
        loop = self._loop
        assert loop is not None
        if asyncio._get_running_loop() is loop:
            # Always from a loop callback, never right here: if the task itself
            # is running (it cancelled the context, or entered the scope with
            # a done one), a task.cancel() now would stay pending after a block
            # that never awaits, and hit the task's next await outside it.
            loop.call_soon(self._fire)
        else:
            # RuntimeError: loop closed, the task is gone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        if self._state != _ENTERED:
            return
        self._state = _CANCELLING
        self._fired = True
        task = self._task
        assert task is not None
        shared = _pending.get(task)
        if shared is not None and not shared.claimed:
            # Nested scopes (the middleware's and a database helper's, say)
            # woken by the same cancellation: one task.cancel() for all of
            # them, claimed by the innermost, which raises ctx.err().
            self._shared = shared
            return
        shared = self._shared = _pending[task] = _TaskCancel()
        task.cancel()

    def _disarm(self) -> bool:
        """Stop watching the context. False if the task was already cancelled."""
        if self._state == _ENTERED:
            self._state = _DISARMED
            return True
        return self._state != _CANCELLING

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc_type, exc)

    def _exit(
        self, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> None:
        unlink = self._unlink
        if callable(unlink):
            self._unlink = None
            unlink()
        state = self._state
        self._state = _EXITED
        if state != _CANCELLING:
            return
        task = self._task
        assert task is not None
        shared = self._shared
        assert shared is not None
        if shared.claimed:
            return  # an inner scope took this cancellation and raised already
        shared.claimed = True
        if _pending.get(task) is shared:
            del _pending[task]
        if task.uncancel() <= self._cancelling and (
            exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        ):
            err = self._ctx.err()
            assert err is not None
            why = cause(self._ctx)
            # err is shared by every scope on this context: start a fresh
            # traceback, or each raise would append to the last one's.
            raise err.with_traceback(None) from (why if why is not err else exc)
