"""One ASGI HTTP request going through the middleware."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .._core import ClientDisconnected, Context, ContextError, DeadlineExceeded, cause
from .._request import Request
from ._receive import ReceiveRelay
from ._response import ResponseState, ResponseTracker
from ._types import Message, Scope
from ._watch import WatchControl, Watchdog

__all__ = ["AsgiRequest"]

_log = logging.getLogger("ctxmiddleware")

# ASGI spec_version -> is it 2.4 or later? Filled as versions are seen, so a
# request costs one dict lookup (and a string compare would be wrong:
# "2.10" < "2.4").
SENDS_RAISE: dict[object, bool] = {}


def sends_raise(version: object) -> bool:
    """Whether the server's send() raises OSError on a closed connection (ASGI 2.4+)."""
    try:
        major, minor = (int(part) for part in str(version).split(".")[:2])
        raises = (major, minor) >= (2, 4)
    except ValueError:
        raises = False
    if len(SENDS_RAISE) < 64:
        SENDS_RAISE[version] = raises
    return raises


class AsgiRequest(ResponseTracker, ReceiveRelay, WatchControl, Request):
    """The request layer's :class:`Request`, plus the ASGI jobs, each in its
    own mixin: the response tracker (``send``), the receive relay with the
    disconnect watcher (``receive``), and the cancellation controller. The
    jobs share one request's state, so they share one object."""

    app_done = False
    scope_state: dict[str, Any] | None = None
    """``scope["state"]``, while the request runs (``request.state.ctx`` lives there)."""
    loop: asyncio.AbstractEventLoop

    # (No __init__ of its own: Request's, called by the middleware with what
    # it reads from the scope.)

    def begin(self, watchdog: Watchdog) -> None:
        """The app is about to run in the current task: note the request with the
        watchdog, or watch it now if its deadline comes before the grace ends."""
        self.loop = watchdog.loop
        self.task = asyncio.current_task(watchdog.loop)  # type: ignore[assignment]
        if self.urgent:
            self.start_watching()
        else:
            watchdog.note(self)

    def deadline_moved(self) -> None:
        if self.urgent and not self.watching:
            self.start_watching()

    def context_swapped(self, ctx: Context) -> None:
        state = self.scope_state
        if state is not None:
            state["ctx"] = ctx  # request.state.ctx follows set_request_context()

    def start_watching(self) -> None:
        if not self.app_done:
            WatchControl.start_watching(self)

    async def send_checked(self, message: Message) -> None:
        """``send`` for ASGI 2.4 servers: a send on a closed connection raises
        OSError, which tells us at once that the client is gone."""
        try:
            await self.send(message)
        except OSError:
            self.client_left()
            raise

    # -- after the app ------------------------------------------------------

    def app_raised(self, exc: BaseException) -> None:
        """The app raised ``exc``. Raises ``ctx.err()`` instead if ``exc`` is the
        ``CancelledError`` of our own cancellation."""
        self.app_done = True
        cancellation = self.cancellation
        if cancellation is not None:
            cancellation.finish(type(exc), exc)
        if isinstance(exc, asyncio.CancelledError):
            self.cancelled_from_outside = True

    def app_returned(self) -> bool:
        """The app returned. True if it returned empty-handed with the root done
        (it swallowed our cancellation): then answer_context_done() answers."""
        self.app_done = True
        cancellation = self.cancellation
        if cancellation is not None:
            cancellation.finish(None, None)
        return self.response == ResponseState.NOT_STARTED and self.root.err() is not None

    async def settle(self, exc: Exception, scope: Scope) -> bool:
        """The app ended with ``exc``. True if it was the request's own
        cancellation (answered here); False: the caller re-raises it."""
        err = self.root.err()
        if err is not None and (
            isinstance(exc, ContextError)
            or self.cancelled_by_us()
            or isinstance(cause(self.root), ClientDisconnected)
        ):
            # What the app raised while being cancelled (a driver's own error,
            # say), or on learning of a disconnect before our cancellation
            # landed (Starlette's ClientDisconnect, an OSError from send), is
            # a consequence of the cancellation.
            if not isinstance(exc, ContextError):
                _log.debug("ctxmiddleware: error while cancelling the app", exc_info=True)
            await self.answer_context_done()
            return True
        self.failed = True
        # Whoever logs its traceback (the server, Starlette) does it outside
        # the request's context: the exception carries the request id (a
        # note in the traceback; RequestContextFilter reads the attribute).
        exc.ctxmiddleware_request_id = self.request_id  # type: ignore[attr-defined]
        exc.add_note(f"ctxmiddleware: request_id={self.request_id}")
        if self.response == ResponseState.NOT_STARTED and "app" not in scope:
            # We wrap the whole app: nothing outside us will answer but the
            # server, whose 500 would lack the request id. (Inside a Starlette
            # app, scope["app"] is set before we run: there its error
            # middleware and the user's 500 handler answer.)
            await self.send_plain(500, b"Internal Server Error")
        return False

    async def answer_context_done(self) -> None:
        """The root is done and the app is over: answer the deadline with the
        timeout status if nothing was sent. (After a disconnect there is nobody
        to answer; after the response started, returning without completing it
        makes the server abort the connection, so the client sees a broken
        response rather than a truncated one that looks whole.)"""
        if isinstance(self.root.err(), DeadlineExceeded) and not self.client_gone:
            await self.send_timeout()

    async def answer_spent(self) -> None:
        """The caller's budget was spent on arrival: answer without running the app."""
        self.app_done = True
        self.root.err()  # (the deadline has passed: this expires the root now)
        await self.send_timeout()

    def finish(self, scope: Scope) -> None:
        """The request is over: outcome, log line, root ended, everything let go."""
        self.ended = True
        err_before = None
        if self.watching:
            self.stop_watcher()
            # Whatever keeps the root after the request (a background job, a
            # pool's timer holding a copy of the request's contextvars) keeps
            # this object too: not the body chunks read ahead.
            self.buffered = None
            err_before = self.root.err()
        elif not self.complete:
            err_before = self.root.err()
        self.end(scope.get("method"), scope.get("path"))
        if err_before is not None:
            # The error and its chain hold this request's frames, which hold
            # the context, which holds the error: a cycle only the cyclic GC
            # would free.
            err_before.__traceback__ = None
            err_before.__context__ = None
            err_before.__cause__ = None
        # The app may keep the root context (without_cancel(ctx) in a
        # background job): let go of the server's channels, so the connection
        # does not outlive the request through it, and no cycle (scope ->
        # state -> root -> here -> server -> scope) is left to the cyclic GC.
        self.server_receive = _receive_after_end
        self.server_send = _send_after_end
        self.scope_state = None  # (the state holds the root, which holds this request)
        if self.cancellation is not None:
            self.cancellation = None


async def _receive_after_end() -> Message:
    return {"type": "http.disconnect"}


async def _send_after_end(message: Message) -> None:
    raise RuntimeError(f"{message.get('type')!r} sent after the request ended")
