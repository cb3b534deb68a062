"""Deadline timers: the running event loop's ``call_later`` or one shared thread.

A timer started while an asyncio loop runs in the current thread uses that loop,
so deadlines in async code cost no thread and fire on the loop that waits for
them. Elsewhere (sync code, worker threads) one daemon thread serves every
deadline from a heap. Either way the callback runs exactly once unless the timer
is cancelled first, and a cancelled timer drops its reference to the callback at
once, so it keeps nothing alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Timer", "start_timer"]

_log = logging.getLogger("ctxmiddleware")
_MAX_WAIT = 86400.0


class Timer:
    """A handle on a pending deadline callback. ``cancel()`` is thread-safe."""

    __slots__ = ("_entry", "_handle", "_loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,
        handle: asyncio.TimerHandle | None,
        entry: list[object] | None,
    ) -> None:
        self._loop = loop
        self._handle = handle
        self._entry = entry

    def cancel(self) -> None:
        handle = self._handle
        if handle is not None:
            self._handle = None
            loop = self._loop
            assert loop is not None
            if asyncio._get_running_loop() is loop:
                handle.cancel()
            else:
                # TimerHandle.cancel() touches loop state: hand it to the loop.
                # RuntimeError: loop closed, the handle died with it.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(handle.cancel)
            return
        entry = self._entry
        if entry is not None:
            self._entry = None
            _thread_timers.cancel(entry)


class _TimerThread:
    """One daemon thread firing callbacks from a heap of ``[when, seq, fn]``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[list[object]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._thread: threading.Thread | None = None

    def add(self, when: float, fn: Callable[[], None]) -> list[object]:
        entry: list[object] = [when, next(self._seq), fn]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ctxmiddleware-timer", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, entry: list[object]) -> None:
        with self._cond:
            if entry[2] is None:
                return
            entry[2] = None
            self._dead += 1
            # Cancelled entries wait in the heap for their deadline; rebuild
            # the heap when they dominate, so memory tracks live timers only.
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dead = 0

    def _run(self) -> None:
        cond = self._cond
        heap = self._heap
        while True:
            with cond:
                heap = self._heap
                while True:
                    while heap and heap[0][2] is None:
                        heapq.heappop(heap)
                        self._dead -= 1
                    if not heap:
                        cond.wait()
                        heap = self._heap
                        continue
                    when = heap[0][0]
                    assert isinstance(when, float)
                    delay = when - time.monotonic()
                    if delay <= 0:
                        entry = heapq.heappop(heap)
                        break
                    # Condition.wait() overflows past threading.TIMEOUT_MAX
                    # (which would kill this thread): wait in bounded steps.
                    cond.wait(delay if delay < _MAX_WAIT else _MAX_WAIT)
                    heap = self._heap
                fn = entry[2]
                entry[2] = None
            if fn is not None:
                try:
                    fn()  # type: ignore[operator]
                except Exception:  # a timer callback must never kill the thread
                    _log.exception("ctxmiddleware: deadline callback failed")
                # Drop it now: while we wait for the next deadline, this local
                # would keep the fired context (and all it refers to) alive.
                fn = None


_thread_timers = _TimerThread()


def start_timer(when: float, fn: Callable[[], None]) -> Timer:
    """Call ``fn()`` once at ``when`` (a ``time.monotonic()`` instant)."""
    loop = asyncio._get_running_loop()
    if loop is not None and not loop.is_closed():
        # Delay relative to time.monotonic(): the loop's own clock (uvloop's
        # included) may have another origin.
        handle = loop.call_later(max(0.0, when - time.monotonic()), fn)
        return Timer(loop, handle, None)
    return Timer(None, None, _thread_timers.add(when, fn))
