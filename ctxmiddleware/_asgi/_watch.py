"""When to start watching a request, and what watching does.

Watching a request costs a cancellation hook on its task, an armed deadline
timer and a task that waits for ``http.disconnect``: far more than a
hello-world request costs the server. Most requests are over within the
task step that started them and never need it. So watching starts only for
requests still running after a grace period, and deciding that must itself
cost next to nothing:

1. each request is noted in its loop's :class:`Watchdog`; the first one of a
   loop iteration schedules one ``call_soon`` check for the whole batch;
2. the check keeps only the requests that are still running (they awaited
   something real) and, if any, sets one timer for the oldest one's grace;
3. the timer starts watching every request whose grace is over, and is set
   again only for requests still waiting.

A request pays step 1 always (a list append, and a share of one callback);
steps 2 and 3 only if it yields to the loop; each step at most once per
request, however long the request then waits (bench/RESULTS.md, "grace").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._core import ClientDisconnected, RootContext, TaskCancellation
from ._types import Message

__all__ = ["WatchControl", "Watchdog"]

_monotonic = time.monotonic


class Watchdog:
    """One per middleware and event loop: starts watching requests past their grace."""

    __slots__ = ("check_scheduled", "fresh", "grace", "in_grace", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self.loop = loop
        self.grace = grace
        self.fresh: list[WatchControl] = []
        self.check_scheduled = False
        self.in_grace: deque[WatchControl] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def note(self, request: WatchControl) -> None:
        """A request started in this loop iteration."""
        self.fresh.append(request)
        if not self.check_scheduled:
            self.check_scheduled = True
            self.loop.call_soon(self.check)

    def check(self) -> None:
        """After the batch's first step: keep the requests that are still running."""
        self.check_scheduled = False
        fresh = self.fresh
        self.fresh = []
        in_grace = self.in_grace
        for request in fresh:
            if not request.ended and not request.watching:
                in_grace.append(request)
        if in_grace and self.timer is None:
            self.schedule()

    def schedule(self) -> None:
        oldest = self.in_grace[0].arrival
        delay = oldest + self.grace - _monotonic()
        self.timer = self.loop.call_later(delay if delay > 0 else 0, self.grace_over)

    def grace_over(self) -> None:
        self.timer = None
        in_grace = self.in_grace
        limit = _monotonic() - self.grace
        while in_grace:
            request = in_grace[0]
            if request.ended or request.watching:
                in_grace.popleft()
            elif request.arrival <= limit:
                in_grace.popleft()
                request.start_watching()
            else:
                break
        if in_grace:
            self.schedule()

    @property
    def pending(self) -> int:
        """Requests noted and not yet watched nor ended (tests read it)."""
        return sum(
            1 for r in (*self.fresh, *self.in_grace) if not r.ended and not r.watching
        )


class WatchControl:
    """Mixin of the ASGI request: the cancellation controller.

    Once watching starts, the request's task is cancelled (once, through the
    core's :class:`TaskCancellation`) when the root context is done, the
    deadline timer is armed, and the receive watcher looks for a disconnect.
    """

    watching = False
    ended = False
    cancellation: TaskCancellation | None = None
    # (From the other parts of the request.)
    root: RootContext
    arrival: float
    task: asyncio.Task[Any]
    complete: bool
    client_gone: bool
    disconnect: Message | None

    # (ReceiveRelay's.)
    may_watch_receive: Callable[[], bool]
    start_watcher: Callable[[], None]
    wake_readers: Callable[[], None]

    def start_watching(self) -> None:
        """Interrupt the app when the root is done; arm the deadline; watch receive()."""
        if self.watching or self.ended:
            return
        self.watching = True
        task = self.task
        # (A task already being cancelled from outside, at shutdown say, is
        # left to that cancellation.)
        if not self.complete and not task.cancelling():
            self.cancellation = TaskCancellation(self.root, task, 0)
        self.root.arm()
        if self.may_watch_receive():
            self.start_watcher()

    def client_left(self) -> None:
        """The server reported a disconnect (or the connection broke)."""
        if self.disconnect is None:
            self.disconnect = {"type": "http.disconnect"}
            self.wake_readers()
        self.client_gone = True
        if not self.complete:
            self.root.cancel(ClientDisconnected())
            if not self.watching:
                self.start_watching()  # within the grace period: cancel the app now
