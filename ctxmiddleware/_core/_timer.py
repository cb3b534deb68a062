"""Deadline timers: the running event loop's ``call_later`` or one shared thread.

A timer started while an asyncio loop runs in the current thread uses that loop,
so deadlines in async code cost no thread and fire on the loop that waits for
them. Elsewhere (sync code, worker threads) one daemon thread serves every
deadline from a heap. Either way the callback runs exactly once unless the timer
is cancelled first, and a cancelled timer drops its reference to the callback at
once, so it keeps nothing alive.

A thread timer is cheap to start and cancel for every request: starting one
takes the heap's lock and wakes the thread only if the new deadline comes
before the one it sleeps until (not when every request has the same timeout);
cancelling one takes no lock and wakes nobody (the entry stays in the heap,
without its callback, until a later ``add()`` or the thread pops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from heapq import heapify, heappop, heappush

__all__ = ["Timer", "start_timer"]

_log = logging.getLogger("ctxmiddleware")
_MAX_WAIT = 86400.0
_PURGE_FLOOR = 64


class Timer:
    """A handle on a pending deadline callback. ``cancel()`` is thread-safe."""

    __slots__ = ()

    def cancel(self) -> None:
        raise NotImplementedError


class _LoopTimer(Timer):
    """A deadline on an asyncio loop (``call_later``)."""

    __slots__ = ("_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, handle: asyncio.TimerHandle) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = handle

    def cancel(self) -> None:
        handle = self._handle
        if handle is None:
            return
        self._handle = None
        loop = self._loop
        if asyncio._get_running_loop() is loop:
            handle.cancel()
        else:
            # TimerHandle.cancel() touches loop state: hand it to the loop.
            # RuntimeError: loop closed, the handle died with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(handle.cancel)


class _Entry(list[object], Timer):  # a list: the heap compares it in C
    """A thread timer: its own heap entry ``[when, seq, fn]``.

    One object per timer, built in C (no ``__init__`` frame); the heap orders
    entries by list comparison (``when``, then the unique ``seq``), in C too.
    """

    __slots__ = ()

    def cancel(self) -> None:
        # Lock-free: one store under the GIL. Racing the thread, either it
        # read fn first (and calls it, as if cancel() came a moment later) or
        # it finds None. The entry is purged from the heap later (see add()).
        self[2] = None


class _TimerThread:
    """One daemon thread firing callbacks from a heap of ``[when, seq, fn]``.

    ``add()`` wakes the thread only if the new deadline comes before the one
    it sleeps until (``_wake_at``), or if no thread runs yet: with one timeout
    for every request, a request's deadline is never the earliest, and the
    thread wakes about once per timeout, not once per request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        # When the thread wakes on its own (lock held): math.inf with no
        # thread (the next add() starts one) or nothing to wait for;
        # -math.inf while it is awake (it looks at the heap before sleeping).
        self._wake_at = math.inf
        # Purge the cancelled entries when the heap outgrows this (amortized
        # O(1) per add(); the heap stays within about twice the live timers).
        self._purge_at = _PURGE_FLOOR
        self._thread: threading.Thread | None = None

    def add(self, when: float, fn: Callable[[], None]) -> _Entry:
        entry = _Entry((when, next(self._seq), fn))
        lock = self._lock
        lock.acquire()  # (not `with`: twice the instructions, on every request)
        try:
            heap = self._heap
            # Cancelled entries on top (with one timeout for all: every
            # earlier request's) go now, so the heap holds the live ones.
            while heap and heap[0][2] is None:
                heappop(heap)
            if len(heap) >= self._purge_at:
                heap = self._purge()
            heappush(heap, entry)
            if when < self._wake_at:
                self._wake()
        finally:
            lock.release()
        return entry

    def _purge(self) -> list[_Entry]:
        """Drop the cancelled entries (lock held); a new heap list."""
        heap = self._heap = [e for e in self._heap if e[2] is not None]
        heapify(heap)
        self._purge_at = max(_PURGE_FLOOR, 2 * len(heap))
        return heap

    def _wake(self) -> None:
        """Wake the thread, or start it (lock held)."""
        if self._thread is None:
            self._wake_at = -math.inf
            self._thread = threading.Thread(
                target=self._run, name="ctxmiddleware-timer", daemon=True
            )
            self._thread.start()
        else:
            self._cond.notify()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # (Only if something broke the loop: the next add() starts another.)
            with self._lock:
                self._thread = None
                self._wake_at = math.inf

    def _serve(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while True:
                    heap = self._heap
                    while heap and heap[0][2] is None:
                        heappop(heap)
                    if not heap:
                        self._wake_at = math.inf
                        cond.wait()
                        self._wake_at = -math.inf
                        continue
                    when = heap[0][0]
                    assert isinstance(when, float)
                    delay = when - time.monotonic()
                    if delay <= 0:
                        entry = heappop(heap)
                        break
                    # Condition.wait() overflows past threading.TIMEOUT_MAX
                    # (which would kill this thread): wait in bounded steps.
                    if delay > _MAX_WAIT:
                        delay = _MAX_WAIT
                        when = time.monotonic() + delay
                    self._wake_at = when
                    cond.wait(delay)
                    self._wake_at = -math.inf
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

    def _after_fork(self) -> None:
        # The thread does not survive a fork, and its lock may have been held
        # by it: the child gets fresh ones, and its first add() a new thread
        # (which serves the inherited timers too, as before the fork).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread = None
        self._wake_at = math.inf


_thread_timers = _TimerThread()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_thread_timers._after_fork)


def start_timer(when: float, fn: Callable[[], None]) -> Timer:
    """Call ``fn()`` once at ``when`` (a ``time.monotonic()`` instant)."""
    loop = asyncio._get_running_loop()
    if loop is not None and not loop.is_closed():
        # Delay relative to time.monotonic(): the loop's own clock (uvloop's
        # included) may have another origin.
        handle = loop.call_later(max(0.0, when - time.monotonic()), fn)
        return _LoopTimer(loop, handle)
    return _thread_timers.add(when, fn)
