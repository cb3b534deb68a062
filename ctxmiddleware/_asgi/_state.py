"""``request.state.ctx`` follows ``set_request_context()``.

The middleware keeps no reference to the scope's ``state`` dict (one less
attribute per request); the rare request that swaps its context finds it in
the frame of ``ContextMiddleware.__call__`` serving it: on the calling
thread's stack (code running in the request's task), or along the request's
task's await chain (a worker thread: the task waits for it).
"""

from __future__ import annotations

import asyncio
import sys
from types import FrameType
from typing import Any

__all__ = ["state_of"]

_QUALNAME = "ContextMiddleware.__call__"
_MAX_DEPTH = 1000


def _state_in(frame: FrameType | None, request: object) -> dict[str, Any] | None:
    if frame is None or frame.f_code.co_qualname != _QUALNAME:
        return None
    f_locals = frame.f_locals
    state = f_locals.get("state")
    if f_locals.get("request") is request and isinstance(state, dict):
        return state
    return None


def state_of(request: object, task: asyncio.Task[Any] | None) -> dict[str, Any] | None:
    """The ``scope["state"]`` dict of the ASGI request ``request`` run by ``task``."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            break
        state = _state_in(frame, request)
        if state is not None:
            return state
        frame = frame.f_back
    if task is None:
        return None
    coro: Any = task.get_coro()
    for _ in range(_MAX_DEPTH):
        if coro is None:
            return None
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        state = _state_in(frame, request)
        if state is not None:
            return state
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return None
