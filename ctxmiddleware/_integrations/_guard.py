"""Out-of-band cancellation shared by the database integrations.

A driver's own cancellation only works when the code awaiting it is cancelled
once (edge-triggered). Sync code in a worker thread is never cancelled at all,
and anyio's level-triggered scopes (Starlette's ``StreamingResponse``) interrupt
the driver's cancel request. So every helper also registers, with
``after_func``, a cancel that goes to the server through a side channel (libpq's
``PQcancel``, a raw PostgreSQL CancelRequest, sqlite's ``interrupt()``) the
moment the context is done, and waits for it to finish before the connection is
used again (a late cancel could otherwise hit the next statement).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio

from .._core._context import Context, after_func

__all__ = ["OutOfBandCancel", "statement_timeout_ms"]

# A cancel request normally completes in a few ms; bound the wait so a dead
# server cannot hang the request.
_CANCEL_WAIT = 5.0


class OutOfBandCancel:
    """Runs ``cancel()`` in its own thread once ``ctx`` is done, until closed."""

    __slots__ = ("_cancel", "_closed", "_finished", "_stop")

    def __init__(self, ctx: Context, cancel: Callable[[], object]) -> None:
        self._cancel = cancel
        self._closed = False
        self._finished = threading.Event()
        self._stop = after_func(ctx, self._run)

    def _run(self) -> None:
        try:
            self._cancel()
        finally:
            self._finished.set()

    def close(self) -> bool:
        """Stop watching; if the cancel already started, wait for it (blocking).

        Returns True if a cancel was sent.
        """
        if self._closed:
            return self._finished.is_set()
        self._closed = True
        if self._stop():
            return False
        self._finished.wait(_CANCEL_WAIT)
        return True

    async def aclose(self) -> bool:
        """Like :meth:`close`, without blocking the event loop or being interrupted."""
        if self._closed:
            return self._finished.is_set()
        self._closed = True
        if self._stop():
            return False
        if not self._finished.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._finished.wait, _CANCEL_WAIT)
        return True


def statement_timeout_ms(ctx: Context) -> int | None:
    """The context's remaining time in whole ms (at least 1), or None without a deadline.

    Raises ``ctx.err()`` if the context is already done.
    """
    ctx.check()
    remaining = ctx.remaining()
    if remaining is None:
        return None
    ms = int(remaining * 1000)
    if ms < 1:
        ctx.check()  # the deadline may have passed just now
        ms = 1
    return ms
